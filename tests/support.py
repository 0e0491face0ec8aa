"""Helpers for tests that run the real thing: configs, gunicorn and CLI processes, HTTPS clients."""
import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from sqlalchemy import event
from sqlalchemy.engine import Engine

from kme import ids
from tests.launcher import launcher

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "password"
# The engine the session's KMEs run on: "sqlite" (files beside each configuration) or "postgresql" (a database
# per configuration in the session's throwaway cluster, tests/postgres.py). `make test` runs the suite with each.
ENGINE = os.environ.get("KME_TEST_ENGINE", "sqlite")
# The session's tests.postgres.Cluster when ENGINE is "postgresql" (set by conftest.py).
cluster = None
# The database URI of each configuration folder that has a PostgreSQL database.
_databases: dict[Path, str] = {}
# The SQLAlchemy engines of the apps tests made in this process.
_engines: "weakref.WeakSet" = weakref.WeakSet()


def _own_runtime_folder() -> None:
    """Unless the caller chose one (tests/run-engines.sh, `make test`), the KMEs that a test session or a bench
    starts keep their runtime files (metrics) in a folder of this process, removed when it ends: the tests and
    benches kill their KMEs, which then cannot remove theirs (the benches had left hundreds in /dev/shm).
    Processes forked from this one inherit the exit hook: only this process removes the folder."""
    if "KME_RUNTIME_DIR" in os.environ:
        return
    folder, owner = tempfile.mkdtemp(prefix="kme-runtime-"), os.getpid()
    os.environ["KME_RUNTIME_DIR"] = folder
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))


_own_runtime_folder()


def bare_environment(config: Path) -> dict:
    """The environment of a process started as an operator's shell would start it: its configuration and PATH,
    and the session's runtime folder (where it may leave its metrics folder, which the session removes)."""
    return {"KME_CONFIG": str(config), "PATH": "/usr/bin:/bin", "KME_RUNTIME_DIR": os.environ["KME_RUNTIME_DIR"]}


@event.listens_for(Engine, "engine_connect")
def _remember(connection):
    _engines.add(connection.engine)


def close_engines() -> None:
    """Close the pooled connections of every app the tests made in this process."""
    for engine in list(_engines):
        engine.dispose()


# Listening ports come from a range below the kernel's ephemeral ports (which client connections take), one range
# per engine, shared out between the pass's pytest-xdist workers: the passes and workers of `make test` run at the
# same time and never pick the same port.
_ENGINE_PORTS = {"sqlite": range(20000, 26000), "postgresql": range(26000, 32000)}[ENGINE]
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_SHARE = len(_ENGINE_PORTS) // _WORKERS
_PORTS = _ENGINE_PORTS[int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]) * _SHARE:][:_SHARE]
_next_port = iter(_PORTS)


def free_port() -> int:
    """A loopback port free now, never the same twice in this process, never one of another pass or worker."""
    for port in _next_port:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port left in {_PORTS}")


@dataclass
class Pki:
    """The test session's certificates (kme.operations.certs layout) and client serials."""

    folder: Path
    serials: dict[str, list[int]]

    def client(self, kme_id: int, sae_id: int) -> tuple[str, str]:
        stem = self.folder / f"kme{kme_id}" / f"sae{sae_id}"
        return str(stem.with_suffix(".crt")), str(stem.with_suffix(".key"))

    @property
    def server_ca(self) -> str:
        return str(self.folder / "ca_servers.crt")


def write_config(folder: Path, pki: Pki, kme_id: int = 1, local_saes=(1, 2), remote_saes=(), other_kmes=(),
                 **this_kme_extra) -> Path:
    """Write a KME configuration into ``folder`` (key directory, database and ports inside it).

    On PostgreSQL, the database is a fresh one of the session's cluster
    (the same one when ``folder`` was configured before), unless the test
    names one itself.
    """
    folder.mkdir(parents=True, exist_ok=True)
    certs = pki.folder / f"kme{kme_id}"
    keys = folder / "keys"
    keys.mkdir(exist_ok=True)
    this_kme = {
        "id": kme_id,
        "nickname": f"Test{kme_id}",
        "sqlite_db_path": "kme.db",
        "key_directory_to_watch": "keys",
        "saes_https_interface": {
            "listen_address": f"127.0.0.1:{free_port()}",
            "ca_client_cert_path": str(certs / "ca_saes.crt"),
            "server_cert_path": str(certs / "kme_server.crt"),
            "server_key_path": str(certs / "kme_server.key"),
        },
    }
    if "db_uri" in this_kme_extra:
        del this_kme["sqlite_db_path"]
    this_kme.update(this_kme_extra)
    if ENGINE == "postgresql" and "sqlite_db_path" not in this_kme_extra and "db_uri" not in this_kme_extra:
        del this_kme["sqlite_db_path"]
        this_kme["db_uri"] = database_of(folder)
    config = {
        "this_kme": this_kme,
        "other_kmes": list(other_kmes),
        "saes": [{"id": sae, "kme_id": kme_id, "https_client_certificate_serial": pki.serials[f"sae{sae}"]}
                 for sae in local_saes] + [{"id": sae, "kme_id": kme} for sae, kme in remote_saes],
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def database_of(folder: Path) -> str:
    """The PostgreSQL database of the configuration in ``folder``, made on first use."""
    folder = folder.resolve()
    if folder not in _databases:
        _databases[folder] = cluster.new_database()
    return _databases[folder]


def lose_database(folder: Path) -> None:
    """The database of the configuration in ``folder`` is lost: SQLite's files deleted, or the PostgreSQL database
    dropped (its connections cut) and made again empty, as a restore from nothing would leave it."""
    uri = _databases.get(folder.resolve())
    if uri is None:
        for suffix in ("", "-wal", "-shm"):
            (folder / f"kme.db{suffix}").unlink(missing_ok=True)
        return
    from sqlalchemy.engine import make_url

    name = make_url(uri).database
    close_engines()
    cluster.admin(f"DROP DATABASE {name} WITH (FORCE)")
    cluster.admin(f"CREATE DATABASE {name}")


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def sae_port(config_path: Path) -> int:
    return int(load_json(config_path)["this_kme"]["saes_https_interface"]["listen_address"].rsplit(":", 1)[1])


def write_keys(path: Path, count: int) -> bytes:
    """Write ``count`` random 32-byte keys to ``path`` in one go; returns the bytes."""
    data = os.urandom(32 * count)
    path.write_bytes(data)
    return data


def stored_bytes(db_path: Path) -> bytes:
    """Every byte the engine keeps of a database: SQLite's file and its WAL; PostgreSQL's files of the database
    and the cluster's WAL, after a checkpoint has written every page out."""
    uri = _databases.get(db_path.parent.resolve())
    if uri is None:
        wal = db_path.with_name(db_path.name + "-wal")
        return db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    (oid,), = Ledger(db_path)._query("SELECT oid FROM pg_database WHERE datname = current_database()")
    checkpoint(db_path)
    data = cluster.folder / "data"
    files = [*sorted((data / "base" / str(oid)).iterdir()), *sorted((data / "pg_wal").glob("0*"))]
    return b"".join(path.read_bytes() for path in files if path.is_file())


def checkpoint(db_path: Path) -> None:
    """What the engine does in time by itself, now: SQLite copies the WAL into the file and truncates it (the
    ingestion worker's housekeeping), PostgreSQL writes every changed page to the table files."""
    uri = _databases.get(db_path.parent.resolve())
    if uri is None:
        with closing(sqlite3.connect(db_path)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    else:
        Ledger(db_path)._query("CHECKPOINT")


def keys_found(raw: bytes, data: bytes) -> list[int]:
    """The positions of the 32-byte keys of ``data`` whose bytes appear in ``raw``."""
    return [i // 32 for i in range(0, len(data) - 31, 32) if data[i:i + 32] in raw]


# Seconds between two polls: the first ones soon, then further apart (a predicate may cost a TLS request or a
# database connection, and the suite's time is the machine's CPU).
POLL_INTERVALS = (0.02, 0.2)


def wait_until(predicate, timeout: float = 10):
    """Poll ``predicate`` until it returns a true value (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    interval = POLL_INTERVALS[0]
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)
        interval = min(interval * 1.5, POLL_INTERVALS[1])


class Process:
    """A process the test started; stopped by its own pid only."""

    def __init__(self, args: list[str], config: Path, log: Path, extra_env: dict | None = None):
        env = dict(os.environ, KME_CONFIG=str(config), PYTHONUNBUFFERED="1", **(extra_env or {}))
        self.log_path = log
        self.log = open(log, "ab")
        # A restarted process appends to the same log: read only what it wrote.
        self.log_start = self.log.tell()
        self.proc = launcher().start(args, env, ROOT, log, None)
        self.terminated = False

    def output(self) -> str:
        with open(self.log_path, "rb") as handle:
            handle.seek(self.log_start)
            return handle.read().decode(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited ({self.proc.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not seen in:\n{self.output()}")
            time.sleep(0.02)

    def terminate(self) -> None:
        """Ask the process to stop (once), without waiting: stop() then waits for it."""
        if self.proc.poll() is None and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def kill(self) -> None:
        """SIGKILL the process and its children (kill_family) unless it ended already; its log closed."""
        try:
            if self.proc.poll() is None:
                kill_family(self)
        except ProcessLookupError:
            # It ended between the look and the signal.
            self.proc.wait()
        self.log.close()

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.log.close()


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(child) for child in handle.read().split()]
    return found


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def kill_family(process) -> None:
    """SIGKILL a process the test started (a gunicorn master, say) and its children, by pid.

    It is stopped first: a gunicorn master that sees a worker die forks
    another at once, and a worker forked between listing the children and
    killing the master would live on, holding the listening socket.
    """
    pid = process.proc.pid
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: _stopped(pid), timeout=10)
    for child in children(pid):
        os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    process.proc.wait()


def _start_gunicorn(interface: str, config: Path, log: Path, workers: int, threads: int,
                    port: int | None = None) -> Process:
    args = [sys.executable, "-m", "gunicorn", "-c", f"deploy/{interface}.py"]
    if port is not None:
        # A second front end of the same configuration, as another host would run it: its own address and socket.
        args += ["--bind", f"127.0.0.1:{port}", "--control-socket", str(log.with_suffix(".ctl"))]
    process = Process([*args, f"wsgi:{interface}_app"], config, log,
                      {"KME_WORKERS": str(workers), "KME_THREADS": str(threads)})
    try:
        wait_for_workers(process, workers)
    except BaseException:
        process.stop()
        raise
    return process


def start_sae_interface(config: Path, log: Path, workers: int = 2, threads: int = 4,
                        port: int | None = None) -> Process:
    """Start the real SAE interface under gunicorn (on ``port`` instead of the configured one) and wait until
    every worker can serve."""
    return _start_gunicorn("sae", config, log, workers, threads, port)


def start_kme_interface(config: Path, log: Path, workers: int = 2, threads: int = 4,
                        port: int | None = None) -> Process:
    """Start the real inter-KME interface under gunicorn (on ``port`` instead of the configured one) and wait
    until every worker can serve."""
    return _start_gunicorn("kme", config, log, workers, threads, port)


def start_skip_interface(config: Path, log: Path, workers: int = 2, threads: int = 4) -> Process:
    """Start the real Cisco SKIP interface under gunicorn and wait until every worker can serve."""
    return _start_gunicorn("skip", config, log, workers, threads)


def start_interop_interface(config: Path, log: Path, workers: int = 1, threads: int = 4) -> Process:
    """Start the real ETSI GS QKD 020 interop interface under gunicorn and wait until every worker can serve."""
    return _start_gunicorn("interop", config, log, workers, threads)


def wait_for_workers(process: "Process", workers: int, timeout: float = 30) -> None:
    """Wait until every gunicorn worker has loaded the app (kme.interfaces.gunicorn_conf logs it)."""
    wait_until(lambda: process.output().count("kme: worker") >= workers or process.proc.poll() is not None,
               timeout)
    if process.proc.poll() is not None:
        raise RuntimeError(f"gunicorn exited:\n{process.output()}")


def start_debug_page(config: Path, log: Path) -> Process:
    """Start the debugging page under gunicorn (one worker) and wait until it can serve."""
    return _start_gunicorn("debug", config, log, 1, 4)


def start_etsi004_server(config: Path, log: Path) -> Process:
    """Start `flask serve-etsi004` and wait until it serves."""
    process = Process([sys.executable, "-m", "flask", "serve-etsi004"], config, log)
    try:
        process.wait_for_output("serving ETSI GS QKD 004")
    except BaseException:
        process.stop()
        raise
    return process


def start_ingest_worker(config: Path, log: Path) -> Process:
    """Start `flask ingest-keys --watch` and wait until it watches."""
    process = Process([sys.executable, "-m", "flask", "ingest-keys", "--watch"], config, log)
    try:
        # "watching N key directories"; a path in an earlier line may hold the word "watching".
        process.wait_for_output(" key directories")
    except BaseException:
        process.stop()
        raise
    return process


def sae_session(pki: Pki, kme_id: int, sae_id: int) -> requests.Session:
    session = requests.Session()
    session.cert = pki.client(kme_id, sae_id)
    session.verify = pki.server_ca
    session.trust_env = False
    return session


def tls_client_context(pki: Pki, cert: tuple[str, str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.server_ca)
    if cert:
        context.load_cert_chain(*cert)
    return context


def run_cli(args: list[str], config: Path | None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`flask ARGS` with this configuration (KME_CONFIG unset for None), its output captured."""
    env = dict(os.environ)
    env.pop("KME_CONFIG", None)
    if config is not None:
        env["KME_CONFIG"] = str(config)
    command = [sys.executable, "-m", "flask", *args]
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        process = launcher().start(command, env, ROOT, out, err)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return subprocess.CompletedProcess(command, process.returncode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


class Ledger:
    """Read-only view of a KME database file, for accounting checks.

    Key material is read through the KME's own key-encryption key: by
    default the file the KME generates beside its configuration (config.kek
    beside the database in these tests).
    """

    def __init__(self, db_path: Path, kek_path: Path | None = None):
        self.db_path = db_path
        self.kek_path = kek_path or db_path.parent / "config.kek"

    def sealer(self):
        """A Sealer with the database's data key, unwrapped with the KEK file."""
        from kme.config import KekSource
        from kme.storage.kek import context, open_kek
        from kme.storage.sealing import Sealer

        facts = dict(self._query("SELECT name, value FROM kme_meta"))
        kek, _created = open_kek(KekSource("file", path=self.kek_path))
        return Sealer(kek.unwrap(facts["data_key"], context(facts["database_id"])))

    def pool_keys(self, where: str = "TRUE", *args) -> list[tuple[int, bytes]]:
        """(position, material) of the pool keys matching ``where``, in position order, opened."""
        from kme.storage.sealing import pool_place

        sealer = self.sealer()
        rows = self._query(f"SELECT link_id, (SELECT name FROM key_files WHERE id = file_id), position, material "
                           f"FROM pool_keys WHERE {where} ORDER BY file_id, position", *args)
        return [(position, material if len(material) == 32 else
                 sealer.open(material, pool_place(link_id, name, position), lambda: "a pool key"))
                for link_id, name, position, material in rows]

    def _uri(self) -> str | None:
        return _databases.get(self.db_path.parent.resolve())

    def connect(self, read_only: bool = True):
        """A connection to the database as something outside the KME (an operator, a fault) would open one:
        autocommit (a SQLite file opened read-only unless asked otherwise); use it in a with block."""
        uri = self._uri()
        if uri is None:
            mode = "ro" if read_only else "rw"
            return closing(sqlite3.connect(f"file:{self.db_path}?mode={mode}", uri=True, isolation_level=None,
                                           check_same_thread=False))
        import psycopg

        return closing(psycopg.connect(uri.replace("postgresql+psycopg://", "postgresql://"), autocommit=True))

    def _query(self, sql: str, *args):
        native = sql if self._uri() is None else sql.replace("?", "%s")
        with self.connect() as connection:
            cursor = connection.execute(native, args)
            if cursor.description is None:
                return []
            return [tuple(bytes(value) if isinstance(value, memoryview) else value for value in row)
                    for row in cursor.fetchall()]

    def contents(self) -> str:
        """A digest of every row of every KME table: what the KME stores, whatever the engine does with pages."""
        digest = hashlib.sha256()
        for table in ("kme_meta", "links", "key_files", "pool_keys", "key_fingerprints", "delivered_keys",
                      "key_slaves", "outgoing_activations", "incoming_activations", "leases", "interop_keys",
                      "interop_acks"):
            digest.update(repr(sorted(self._query(f"SELECT * FROM {table}"))).encode())
        return digest.hexdigest()

    def snapshot(self) -> tuple:
        """What must not change when the KME refuses to act: every row, and on SQLite every byte of the file."""
        stored = hashlib.sha256(stored_bytes(self.db_path)).hexdigest() if self._uri() is None else None
        return self.contents(), stored

    def write_rows(self, sql: str, rows: list[tuple]) -> None:
        """Run one statement for each of ``rows``, in one transaction."""
        native = sql if self._uri() is None else sql.replace("?", "%s")
        with self.connect(read_only=False) as connection:
            connection.execute("BEGIN IMMEDIATE" if self._uri() is None else "BEGIN")
            connection.cursor().executemany(native, rows)
            connection.execute("COMMIT")

    def write(self, *statements: tuple) -> list[int]:
        """Run (sql, *args) statements in one transaction, as something outside the KME would; their row counts."""
        native = (lambda sql: sql) if self._uri() is None else (lambda sql: sql.replace("?", "%s"))
        with self.connect(read_only=False) as connection:
            connection.execute("BEGIN IMMEDIATE" if self._uri() is None else "BEGIN")
            counts = [connection.execute(native(sql), args).rowcount for sql, *args in statements]
            connection.execute("COMMIT")
        return counts

    @contextmanager
    def stall(self):
        """Hold the database's write lock, as a stalled disk would: the KME's write transactions wait until the
        block ends."""
        with self.connect(read_only=False) as connection:
            if self._uri() is None:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    yield
                finally:
                    connection.execute("ROLLBACK")
            else:
                from kme.storage.backends.postgresql import WRITERS_LOCK

                connection.execute(f"SELECT pg_advisory_lock({WRITERS_LOCK})")
                try:
                    yield
                finally:
                    connection.execute(f"SELECT pg_advisory_unlock({WRITERS_LOCK})")

    COUNTERS = ("ingested", "available", "reserved", "peer_held", "unconfirmed", "delivered", "discarded",
                "set_aside")

    def link(self, link_id) -> dict:
        """The counters of the link with KME ``link_id`` (an ID as configured)."""
        (row,) = self._query(f"SELECT {', '.join(self.COUNTERS)} FROM links WHERE peer_kme_id = ?",
                             ids.number(link_id))
        return dict(zip(self.COUNTERS, row))

    def pool_size(self, link_id, state: int) -> int:
        return self._query("SELECT COUNT(*) FROM pool_keys WHERE link_id = ? AND state = ?", ids.number(link_id),
                           state)[0][0]

    def waiting(self) -> int:
        return self._query("SELECT COUNT(*) FROM delivered_keys")[0][0]

    def assert_exact(self, link_id) -> dict:
        """Check the link's counters against each other and against the pool rows."""
        counts = self.link(link_id)
        assert counts["ingested"] == sum(counts[name] for name in self.COUNTERS[1:]), counts
        assert (counts["available"], counts["peer_held"], counts["reserved"], counts["unconfirmed"]) == (
            self.pool_size(link_id, 0), self.pool_size(link_id, 1), self.pool_size(link_id, 2),
            self.pool_size(link_id, 3)), counts
        return counts


def confirm_link(this_kme_id: int, link_id: int) -> None:
    """In process, inside an app context: the peer says it holds every key file of the link we know, whole."""
    from sqlalchemy import select

    from kme.storage.db import db
    from kme.storage.keystore import progress
    from kme.storage.models import KeyFile

    names = db.session.scalars(select(KeyFile.name).where(KeyFile.link_id == link_id)).all()
    db.session.commit()
    offers = [progress.FileOffer(name, 2**40, seq) for seq, name in enumerate(names, start=1)]
    progress.answered(this_kme_id, link_id, 0, progress.Exchange("ab" * 16, offers, 0, 0))
