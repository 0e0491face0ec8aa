"""A throwaway PostgreSQL cluster for the test session, and a fresh database in it for each KME a test configures.

initdb and pg_ctl come from Debian's postgresql package (tests/install-tools.sh
installs it when missing). PostgreSQL refuses to run as root: when the tests
run as root, the cluster runs as the unprivileged user ``postgres`` (made by
that package). It listens on a loopback port and a Unix socket inside its
folder, asks for a password (scram-sha-256), and is stopped and removed at
the end of the session; should the process that made it end without saying
so (a crash, a kill), a guardian process stops and removes it then.
"""
import glob
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

USER = "kme"
PASSWORD = "kme-test-password"
# A throwaway cluster lives in memory where there is room for the suite's databases (about 3 GB by its end, each
# test's a copy of the template): no disk write for them beside the SQLite pass's fsyncs, and its removal at the
# end is instant (7.6 s on disk, the last step of the suite's longest pass).
MEMORY_FOLDER = Path("/dev/shm")
MEMORY_ROOM = 8 * 2**30


def _binaries() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not versions:
        raise RuntimeError("PostgreSQL's initdb/pg_ctl not found: run tests/install-tools.sh")
    return Path(versions[-1]).parent


class Cluster:
    """One PostgreSQL server of the test session; ``durable=False`` (the tests) skips its fsyncs, which no test
    needs and which would take much of the suite's time; benchmarks keep them."""

    def __init__(self, port: int, durable: bool = True):
        self.port = port
        self.durable = durable
        in_memory = not durable and MEMORY_FOLDER.is_dir() and shutil.disk_usage(MEMORY_FOLDER).free >= MEMORY_ROOM
        self.folder = Path(tempfile.mkdtemp(prefix="kme-pg-", dir=MEMORY_FOLDER if in_memory else None))
        self._bin = _binaries()
        self._owner = None if os.geteuid() else pwd.getpwnam("postgres")
        self._count = 0
        self._guardian: subprocess.Popen | None = None
        # libpq refuses a passfile that others may read; the KME processes of the tests read this one.
        self.passfile = self.folder / "pgpass"
        self.passfile.write_text(f"127.0.0.1:{port}:*:{USER}:{PASSWORD}\n")
        self.passfile.chmod(0o600)

    def _run(self, *command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, timeout=120,
                       user=self._owner.pw_uid if self._owner else None,
                       group=self._owner.pw_gid if self._owner else None)

    def _guard(self) -> None:
        """Start the guardian: a process of its own session that, once this process is gone without stop()
        (a crash, a kill), stops the server and removes the cluster's folder."""
        if self._guardian is not None:
            return
        data, folder = shlex.quote(str(self.folder / "data")), shlex.quote(str(self.folder))
        script = (f"while [ -d /proc/{os.getpid()} ]; do sleep 1; done; "
                  f"if [ -f {data}/postmaster.pid ]; then {shlex.quote(str(self._bin / 'pg_ctl'))} -D {data} "
                  f"-m immediate -w stop; fi; rm -rf {folder}")
        self._guardian = subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          user=self._owner.pw_uid if self._owner else None,
                                          group=self._owner.pw_gid if self._owner else None)

    def _own_folder(self, *paths: Path) -> None:
        if self._owner:
            for path in (self.folder, *paths):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
            self.folder.chmod(0o755)

    def start(self) -> None:
        data, secret = self.folder / "data", self.folder / "initdb-password"
        secret.write_text(PASSWORD)
        self._own_folder(secret)
        self._run(str(self._bin / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={secret}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        secret.unlink()
        self._guard()
        self.start_server()

    def start_as_standby_of(self, primary: "Cluster") -> None:
        """Copy ``primary`` with pg_basebackup and start as its streaming standby (asynchronous unless the primary
        names standbys in synchronous_standby_names)."""
        # The standby's WAL receiver runs as the server's user and reads its own copy of the password.
        replication = self.folder / "pgpass-replication"
        replication.write_text(f"127.0.0.1:{primary.port}:*:{USER}:{PASSWORD}\n")
        replication.chmod(0o600)
        self._own_folder(replication)
        subprocess.run([str(self._bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", USER,
                        "-D", str(self.folder / "data"), "-R", "-X", "stream", "-c", "fast",
                        "-d", f"host=127.0.0.1 port={primary.port} user={USER} passfile={replication}"],
                       check=True, capture_output=True, timeout=120,
                       user=self._owner.pw_uid if self._owner else None,
                       group=self._owner.pw_gid if self._owner else None)
        self._guard()
        self.start_server()

    def start_server(self) -> None:
        """Start the server on its data folder (made by start or start_as_standby_of)."""
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=400 "
                   "-c shared_buffers=64MB")
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")

    def stop_server(self) -> None:
        """Stop the server, its data kept (a standby cut off from its primary, a primary that died)."""
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")

    def promote(self) -> None:
        """Make a standby the primary (a failover)."""
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.folder / "data"), "-w", "-t", "60", "promote")

    def query(self, database: str, statement: str):
        """The first row of one statement."""
        with psycopg.connect(self.uri(database, driver=False), autocommit=True) as connection:
            return connection.execute(statement).fetchone()

    def stop(self) -> None:
        """Stop the server if it runs, and remove its folder (and the guardian, with nothing left to do)."""
        if (self.folder / "data" / "postmaster.pid").exists():
            self.stop_server()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._guardian is not None:
            self._guardian.kill()
            self._guardian.wait(10)
            self._guardian = None

    def admin(self, statement: str) -> None:
        """Run one statement in the maintenance database (CREATE DATABASE cannot run in a transaction)."""
        with psycopg.connect(self.uri("postgres", driver=False), autocommit=True) as connection:
            connection.execute(statement)

    def uri(self, database: str, driver: bool = True) -> str:
        scheme = "postgresql+psycopg" if driver else "postgresql"
        return f"{scheme}://{USER}@127.0.0.1:{self.port}/{database}?passfile={self.passfile}"

    def new_database(self) -> str:
        """A fresh, empty database; its URI (the password in the passfile, not in the URI)."""
        self._count += 1
        name = f"kme_{self._count}"
        self.admin(f"CREATE DATABASE {name}")
        return self.uri(name)
