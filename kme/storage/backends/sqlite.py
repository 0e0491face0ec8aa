"""SQLite, the embedded engine (one host): everything specific to it but the writers' turn and group commit
(kme.storage.backends.sqlite_connections, whose objects the Backend of an app's engine holds).

Pragmas on every connection, BEGIN IMMEDIATE for write transactions (so two
processes never both read and then both write), the claim statements, the
database file's identity, the health probe, and WAL checkpoints.
"""
import fcntl
import os
import sqlite3
import time
from contextlib import closing, contextmanager

from sqlalchemy import bindparam, event, select
from sqlalchemy.dialects.sqlite import insert

from kme.database_uris import sqlite_path
from kme.storage.backends.sqlite_connections import GroupCommit, KeptConnections, WriterQueue, database_path
from kme.storage.backends.transaction_scope import TransactionScope
from kme.storage.compiled import SQLITE, Statement, many, run, run_many
from kme.storage.models import Heartbeat, KeyFingerprint
from kme.storage.statements import READ_META

WRITE_OPTION = "kme_write"
_fingerprints = KeyFingerprint.__table__
_INSERT_FINGERPRINT = Statement(insert(_fingerprints).values(fingerprint=bindparam("fingerprint")),
                                row=("fingerprint",))
_ADD_FINGERPRINT = Statement(insert(_fingerprints).values(fingerprint=bindparam("fingerprint"))
                             .on_conflict_do_nothing(), row=("fingerprint",))
_KNOWN_FINGERPRINTS = Statement(lambda fingerprints: select(_fingerprints.c.fingerprint).where(
    _fingerprints.c.fingerprint.in_(many("fingerprints", fingerprints))), lists=("fingerprints",))
_PROBE = Statement(insert(Heartbeat.__table__).values(name="healthz-probe", beat_at=bindparam("beat_at"))
                   .prefix_with("OR REPLACE"))
# Errors of the driver itself, raised by the statements that run past SQLAlchemy.
DRIVER_ERRORS = (sqlite3.Error,)

_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA synchronous=FULL",
    # Consumed key bytes are overwritten in the database file, not just unlinked.
    "PRAGMA secure_delete=ON",
    "PRAGMA foreign_keys=ON",
    # 16 MiB of page cache (grown only as pages are used): the fingerprint
    # index is written in random order at ingestion.
    "PRAGMA cache_size=-16384",
)

class _Sql:
    """SQLite's dialect, and what it does its own way."""

    dialect = SQLITE

    @staticmethod
    def lock_name(_connection, _name: str) -> None:
        """Nothing to take: the transaction holds the database's write lock."""

    @staticmethod
    def add_fingerprints(connection, ordered: list[int], chunk: int) -> set[int]:
        """The usual case costs one executemany: an insert that skips known fingerprints, whose row count says
        whether any was known. Only then is it undone to a savepoint, the known ones looked up, and the others
        inserted."""
        connection.execute("SAVEPOINT fingerprints")
        inserted = run_many(connection, _ADD_FINGERPRINT, zip(ordered)).rowcount
        if inserted == len(ordered):
            connection.execute("RELEASE fingerprints")
            return set()
        connection.execute("ROLLBACK TO fingerprints")
        connection.execute("RELEASE fingerprints")
        known = set()
        for start in range(0, len(ordered), chunk):
            known.update(row[0] for row in run(connection, _KNOWN_FINGERPRINTS,
                                               fingerprints=ordered[start:start + chunk]))
        run_many(connection, _INSERT_FINGERPRINT, zip(fingerprint for fingerprint in ordered
                                                      if fingerprint not in known))
        return known


class Connection(sqlite3.Connection):
    """A sqlite3 connection that carries SQLite's spelling of the key store's statements."""

    sql = _Sql


def engine_options(_threads: int) -> dict:
    """SQLAlchemy engine options: connections of the class above (its pool is SQLAlchemy's default)."""
    return {"connect_args": {"factory": Connection}}


def failure_cause(error) -> str:
    """A short, key-free description of a SQLite failure (exception or its text), for clients and /healthz."""
    text = str(getattr(error, "orig", error)).lower()
    for needle, cause in (("disk is full", "the database disk is full"),
                          ("readonly", "the database is read-only"),
                          ("read-only", "the database is read-only"),
                          ("unable to open", "the database file cannot be opened"),
                          ("no such table", "the database has no KME schema (deleted or replaced?)"),
                          ("disk i/o", "disk I/O error on the database"),
                          ("locked", "the database is locked by another process for too long")):
        if needle in text:
            return cause
    return "the database failed"


class Backend:
    """SQLite under the engine of one app, and what this process keeps about its file: the file's identity as
    first opened, the writers' turn, the group commit and the connections kept past the pool."""

    DRIVER_ERRORS = DRIVER_ERRORS
    failure_cause = staticmethod(failure_cause)

    def __init__(self, engine):
        """Set the pragmas on each new connection and take over BEGIN from pysqlite."""
        self.engine = engine
        self.writers = WriterQueue(database_path(engine))
        self.kept = KeptConnections(engine)
        self.group_commit = GroupCommit(self.writers, self.kept)
        # (device, inode) of the database file when this engine first opened it.
        self._opened: tuple[int, int] | None = None
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "begin", _on_begin)

    def _on_connect(self, dbapi_connection, _record) -> None:
        # pysqlite's own transaction handling would issue a plain deferred
        # BEGIN lazily; we issue BEGIN ourselves in _on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in _PRAGMAS:
            cursor.execute(pragma)
        cursor.close()
        path = database_path(self.engine)
        if path and self._opened is None:
            found = os.stat(path)
            self._opened = (found.st_dev, found.st_ino)

    @contextmanager
    def write_session(self, session):
        """Start ``session``'s write transaction: this process's and the other processes' writers wait their
        turn, then BEGIN IMMEDIATE takes the database's write lock."""
        with self.writers.turn():
            session.connection(execution_options={WRITE_OPTION: True})
            yield

    def schema_connection(self):
        """A connection whose transaction takes the write lock at BEGIN (for creating the schema)."""
        return self.engine.connect().execution_options(**{WRITE_OPTION: True})

    def grouped_write(self, work):
        """``work(connection)`` in a group commit (kme.storage.backends.sqlite_connections.GroupCommit)."""
        return self.group_commit.run(work)

    def transaction_scope(self) -> TransactionScope | None:
        """The scope of the group commit whose units this thread runs, or None outside one."""
        return self.group_commit.scopes.current()

    def read_unless_changed(self, key, read):
        """``read(connection)``, or its last value for ``key`` on this thread while nothing was committed since
        (KeptConnections.read_unless_changed)."""
        return self.kept.read_unless_changed(key, read)

    def read_connection(self):
        """This thread's connection for the hot path's reads; each statement is its own read transaction."""
        return self.kept.reading()

    def dispose(self) -> None:
        """Close every connection to the database, kept ones included; new ones are opened at next use."""
        self.kept.dispose()
        self.engine.dispose()

    def periodic_lock(self) -> "PeriodicLock":
        """The lock that makes one background worker of the KME run its periodic work."""
        return PeriodicLock(self.engine)

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it, so erased key bytes leave the -wal file.

        Runs outside any transaction (a transaction's snapshot would pin the WAL).
        """
        raw = self.engine.raw_connection()
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            raw.close()

    def file_problem(self) -> str | None:
        """Why the database file this process uses is no longer the one at its path, or None.

        A deleted or replaced file would otherwise go on taking writes that
        nobody will ever read again, or hand out keys again from a fresh file.
        """
        path = database_path(self.engine)
        if path is None or self._opened is None:
            return None
        try:
            found = os.stat(path)
        except FileNotFoundError:
            return f"the database file {path} was deleted while the KME was running; restart it"
        except OSError as exc:
            return f"the database file {path} cannot be checked ({exc.strerror})"
        if (found.st_dev, found.st_ino) != self._opened:
            return f"the database file {path} was replaced while the KME was running; restart it"
        return None

    def write_probe(self) -> str | None:
        """Try a small write on a fresh connection; the database error, or None if writes work.

        A fresh connection sees the file as it is now (a pooled one may have
        been opened read-only, or point at a deleted file); ``mode=rw`` never
        creates a missing file.
        """
        path = database_path(self.engine)
        if path is None:
            return None
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=2, isolation_level=None,
                                         factory=Connection)) as raw:
                raw.execute("BEGIN IMMEDIATE")
                run(raw, _PROBE, beat_at=time.time())
                raw.execute("COMMIT")
        except sqlite3.Error as exc:
            return str(exc)
        return None


def _on_begin(connection) -> None:
    immediate = connection.get_execution_options().get(WRITE_OPTION)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class PeriodicLock:
    """Whether this process runs the KME's periodic work: an flock of a file beside the database, taken when free
    and held until release() or the process ends (the kernel releases it then)."""

    def __init__(self, engine):
        path = database_path(engine)
        self._path = None if path is None else f"{path}-periodic"
        self._fd: int | None = None

    def held(self) -> bool:
        if self._path is None or self._fd is not None:
            return True
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_meta(uri: str) -> dict[str, bytes]:
    """The kme_meta rows of the database, read-only; empty before the file or the schema exists, and when the
    file cannot be read now (the process's first use of the database reports why)."""
    path = sqlite_path(uri)
    if path is None or not os.path.exists(path):
        return {}
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, factory=Connection)) as raw:
            return dict(run(raw, READ_META).fetchall())
    except sqlite3.Error:
        return {}
