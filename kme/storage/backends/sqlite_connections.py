"""How the threads and processes of a KME share one SQLite file: the writers' turn, group commit, and the
connections of the hot path kept out of SQLAlchemy's pool.

Each is an object of one engine, held by the app's storage (its SQLite
backend, kme.storage.backends.sqlite.Backend): nothing here is kept per
module. The statements themselves are in kme.storage.backends.sqlite.
"""
import fcntl
import os
import sqlite3
import threading
from contextlib import contextmanager

from kme.storage.backends.transaction_scope import ScopeOfThread, TransactionScope


def database_path(engine) -> str | None:
    """The database file of ``engine`` (None in memory)."""
    database = engine.url.database
    return None if not database or database == ":memory:" else database


class WriterQueue:
    """Writers of one database file, one at a time, handed over at once.

    SQLite's own busy handler makes a waiting writer sleep in growing steps
    (up to 100 ms), which makes the tails of every write. Writers here wait
    on a thread lock, then on an flock of a file beside the database; both
    wake the next writer as soon as the lock is released (a process that
    dies releases its flock with it). SQLite's locking stays underneath: a
    writer that does not queue here (the health probe, another tool) is
    still excluded by it.
    """

    def __init__(self, path: str | None):
        self._threads = threading.Lock()
        self._path = None if path is None else f"{path}-writers"
        self._fd: int | None = None
        self._pid = 0

    @contextmanager
    def turn(self):
        with self._threads:
            fd = self._file()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _file(self) -> int | None:
        if self._path is None:
            return None
        if self._pid != os.getpid():
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                # A read-only folder: SQLite's busy handler alone orders the writers.
                self._fd = None
            self._pid = os.getpid()
        return self._fd


class _Work:
    """One caller's unit of work in a group commit, and its outcome."""

    __slots__ = ("work", "value", "error", "done", "wake")

    def __init__(self, work):
        self.work = work
        self.value = self.error = None
        self.done = False
        self.wake = threading.Event()


class GroupCommit:
    """Write transactions of one process's threads, run together in one transaction and one fsync.

    The first caller to arrive leads: it takes the writers' turn, then runs every
    unit of work waiting, in rounds until none is (_run_batch; a unit that
    raises is undone alone and gets its exception), commits once, and wakes
    the others with their outcome. Callers that arrive during the commit wait
    for the next leader, the first of them. A caller's answer therefore
    always follows the commit of its own work. The units of a batch share a
    TransactionScope, whose after-commit actions the leader takes once the
    batch committed, before it wakes anyone.
    """

    def __init__(self, writers: WriterQueue, kept: "KeptConnections"):
        self._writers, self._kept = writers, kept
        self._lock = threading.Lock()
        self._waiting: list[_Work] = []
        self._leading = False
        self.scopes = ScopeOfThread()

    def waiting(self) -> int:
        """Callers waiting for a leader to take their work."""
        with self._lock:
            return len(self._waiting)

    def leading(self) -> bool:
        """Whether a leader is running a batch."""
        with self._lock:
            return self._leading

    def run(self, work):
        """``work(connection)`` on a sqlite3 connection in a write transaction shared with this process's
        concurrent callers; its value once committed, or its exception (nothing of it kept)."""
        item = _Work(work)
        with self._lock:
            self._waiting.append(item)
            lead = not self._leading
            self._leading = True
        if not lead:
            item.wake.wait()
        if not item.done:
            self._lead()
        if item.error is not None:
            raise item.error
        return item.value

    def _take(self) -> list[_Work]:
        with self._lock:
            batch, self._waiting = self._waiting, []
        return batch

    def _lead(self) -> None:
        batch: list[_Work] = []
        scope = self.scopes.enter()
        try:
            with self._writers.turn(), self._kept.writing() as connection:
                _run_batch(connection, self._take, batch, scope)
            scope.committed()
        except BaseException as exc:
            batch = batch or self._take()
            for item in batch:
                if item.error is None:
                    item.value, item.error = None, exc
        finally:
            self.scopes.leave()
            with self._lock:
                for item in batch:
                    item.done = True
                    item.wake.set()
                if self._waiting:
                    self._waiting[0].wake.set()
                else:
                    self._leading = False


def _run_batch(connection, take, ran: list[_Work], scope: TransactionScope) -> None:
    """Run the units ``take()`` gives, again until it gives none, in one transaction; commit once.

    Units are taken once the writers' turn is held, and again after each
    round, so callers that arrived while another process committed, or while
    this batch ran, share its fsync. A caller waits for its one unit, so at
    most one unit per thread joins. Each unit but the transaction's first
    runs in a savepoint; a first that raises is undone with the whole (still
    empty) transaction, which begins again.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        empty = True
        while pending := take():
            # Recorded before any runs: if the transaction fails, every unit taken learns it.
            ran.extend(pending)
            for item in pending:
                if empty:
                    empty = not _run_unit(connection, item, scope, "ROLLBACK", "BEGIN IMMEDIATE")
                    continue
                connection.execute("SAVEPOINT unit")
                _run_unit(connection, item, scope, "ROLLBACK TO unit")
                connection.execute("RELEASE unit")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _run_unit(connection, item: _Work, scope: TransactionScope, *undo: str) -> bool:
    """Run one unit; if it raises, keep its exception for its caller and run ``undo``. Whether it succeeded."""
    try:
        item.value = item.work(connection)
    except Exception as exc:
        scope.unit_ended(False)
        item.error = exc
        for statement in undo:
            connection.execute(statement)
        return False
    scope.unit_ended(True)
    return True


class KeptConnections:
    """Driver connections of one database file kept out of SQLAlchemy's pool: one per thread for reads, one for
    the leader of the group commit.

    A checkout from the pool and back cost more than Get status' one
    statement, and under concurrent threads twice that. dispose() closes them
    all (after a storage fault); each is opened again at its next use.
    """

    def __init__(self, engine):
        self._engine = engine
        self._in_memory = database_path(engine) is None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._open: list[sqlite3.Connection] = []
        self._generation = 0
        self._writer: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        raw = self._engine.raw_connection()
        connection = raw.driver_connection
        # Out of the pool for good: closed only by dispose().
        raw.detach()
        with self._lock:
            self._open.append(connection)
        return connection

    def _reader(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "generation", -1) != self._generation:
            local.connection, local.generation = self._connect(), self._generation
            # What this connection read, with its data version then (read_unless_changed).
            local.figures = {}
        return local.connection

    def read_unless_changed(self, key, read):
        """``read(connection)`` on this thread's connection, or the value it gave last for ``key`` on it if no
        connection has committed a change to the database since: SQLite's ``PRAGMA data_version`` changes with
        every commit of another connection, of any process, and a reader commits nothing. An in-memory database
        is read each time (its one connection's own commits leave the version as it is)."""
        if self._in_memory:
            with self.reading() as connection:
                return read(connection)
        connection = self._reader()
        # The version first: a commit between it and the read makes the next call read again.
        version = connection.execute("PRAGMA data_version").fetchone()[0]
        held = self._local.figures.get(key)
        if held is not None and held[0] == version:
            return held[1]
        value = read(connection)
        self._local.figures[key] = (version, value)
        return value

    def _writer_connection(self) -> sqlite3.Connection:
        """The leader's connection (leaders take turns, so one is enough); a fresh one if the last batch left it
        inside a transaction (its ROLLBACK failed)."""
        if self._writer is None or self._writer.in_transaction:
            self._writer = self._connect()
        return self._writer

    def dispose(self) -> None:
        """Close every kept connection; each is opened again at its next use."""
        with self._lock:
            connections, self._open = self._open, []
            self._generation += 1
            self._writer = None
        for connection in connections:
            connection.close()

    def reading(self):
        """A context manager giving this thread's connection for reads; each statement is its own read
        transaction."""
        return self._driver_connection(self._reader)

    def writing(self):
        """A context manager giving the group commit's leader its connection."""
        return self._driver_connection(self._writer_connection)

    @contextmanager
    def _driver_connection(self, kept):
        """``kept()`` for a file database; for an in-memory one, the pool's connection (the database itself)."""
        if not self._in_memory:
            yield kept()
            return
        raw = self._engine.raw_connection()
        try:
            yield raw.driver_connection
        finally:
            raw.close()
