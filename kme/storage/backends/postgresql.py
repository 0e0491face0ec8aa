"""PostgreSQL through psycopg 3, for a KME on several hosts: everything specific to it.

Write transactions of SQLAlchemy sessions (ingestion, settling, leases,
the background work) hold one advisory lock of the database for their
duration, so they run one at a time as on SQLite, whichever host runs them.
The hot path does not take it: its claims skip rows other transactions have
locked (FOR UPDATE SKIP LOCKED), so concurrent claims on several hosts never
wait on each other's keys and never take the same key; what they read to
write back (a link's byte histogram, a delivered key's slaves, a peer's
positions) they lock first. A transaction PostgreSQL aborts to break a
deadlock or a serialization failure is run again.

The password comes from the URI, or from libpq itself: PGPASSWORD, the
passfile named by PGPASSFILE or by ``passfile=`` in the URI. It is never
written anywhere: kme.database_uris.describe() leaves it out.
"""
import itertools
import logging
from contextlib import closing, contextmanager

import psycopg
from psycopg import errors as pg_errors
from sqlalchemy import BigInteger, bindparam, event, func, select
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.engine import make_url

from kme.storage.backends.transaction_scope import ScopeOfThread, TransactionScope
from kme.storage.compiled import POSTGRESQL, Statement, run
from kme.storage.models import Heartbeat, KeyFingerprint
from kme.storage.statements import READ_META

log = logging.getLogger(__name__)

WRITE_OPTION = "kme_write"
DRIVER_ERRORS = (psycopg.Error,)
# Keys of the database's advisory locks (any 64-bit numbers; they only have to differ from each other).
WRITERS_LOCK = 0x4B4D_4501
PERIODIC_LOCK = 0x4B4D_4502
# Seconds: a server that does not answer a connection attempt within this is down for the caller.
CONNECT_TIMEOUT = 5
# Times a transaction that PostgreSQL aborted (deadlock, serialization failure) is run again.
RETRIES = 3
_RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)

_fingerprints = KeyFingerprint.__table__
_LOCK_NAME = Statement(select(func.pg_advisory_xact_lock(func.hashtextextended(bindparam("name"), 0))))
_ADD_FINGERPRINTS = Statement(
    insert(_fingerprints).from_select(["fingerprint"], select(func.unnest(bindparam(
        "fingerprints", type_=ARRAY(BigInteger))))).on_conflict_do_nothing().returning(_fingerprints.c.fingerprint))
_TAKE_PERIODIC = Statement(select(func.pg_try_advisory_lock(PERIODIC_LOCK)))
_ALIVE = Statement(select(1))
# Run through SQLAlchemy: it begins a Session's write transaction.
_TAKE_WRITERS = select(func.pg_advisory_xact_lock(WRITERS_LOCK))
_heartbeats = Heartbeat.__table__
_PROBE = Statement(insert(_heartbeats).values(name="healthz-probe", beat_at=func.extract("epoch", func.now()))
                   .on_conflict_do_update(index_elements=[_heartbeats.c.name],
                                          set_={"beat_at": insert(_heartbeats).excluded.beat_at}))


class _Sql:
    """PostgreSQL's dialect, and what it does its own way."""

    dialect = POSTGRESQL

    @staticmethod
    def lock_name(connection, name: str) -> None:
        """A transaction-scoped advisory lock on a 64-bit hash of the name (a collision only makes two
        transactions wait for each other)."""
        run(connection, _LOCK_NAME, name=name)

    @staticmethod
    def add_fingerprints(connection, ordered: list[int], _chunk: int) -> set[int]:
        """One statement: the array is inserted, known fingerprints skipped; those inserted come back."""
        inserted = run(connection, _ADD_FINGERPRINTS, fingerprints=ordered).fetchall()
        if len(inserted) == len(ordered):
            return set()
        return set(ordered) - {row[0] for row in inserted}


class Connection(psycopg.Connection):
    """A psycopg connection that carries PostgreSQL's dialect."""

    sql = _Sql


def engine_options(threads: int) -> dict:
    """A pool per process: one connection per thread, as many again for a thread that needs two at once
    (a session and the hot path); each checked before use, so connections to a server that failed over
    are replaced instead of failing a request."""
    return {"pool_size": threads, "max_overflow": threads, "pool_timeout": 10, "pool_pre_ping": True,
            "connect_args": {"connect_timeout": CONNECT_TIMEOUT, "application_name": "kme"}}


_CAUSES = (
    ("08", "the database server cannot be reached"),
    ("53100", "the database disk is full"),
    ("53", "the database server is out of resources"),
    ("25006", "the database is read-only (a standby?)"),
    ("57P", "the database server is shutting down or restarting"),
    ("42P01", "the database has no KME schema"),
    ("28", "the database refused the KME's credentials"),
    ("40", "the database aborted the transaction"),
)


def failure_cause(error) -> str:
    """A short, key-free description of a PostgreSQL failure (exception or its text), for clients and /healthz."""
    original = getattr(error, "orig", error)
    state = getattr(original, "sqlstate", None) or ""
    for prefix, cause in _CAUSES:
        if state.startswith(prefix):
            return cause
    # A connection refused at start-up carries no SQLSTATE, only libpq's words.
    words = str(original)
    if "authentication failed" in words or "no password supplied" in words:
        return "the database refused the KME's credentials"
    if isinstance(original, psycopg.OperationalError) or words.startswith("connection failed"):
        return "the database server cannot be reached"
    return "the database failed"


class Backend:
    """PostgreSQL under the engine of one app: its connections are psycopg's, of the class above; write
    transactions take the writers' advisory lock when they begin. Nothing is kept per process but the pool."""

    DRIVER_ERRORS = DRIVER_ERRORS
    failure_cause = staticmethod(failure_cause)

    def __init__(self, engine):
        self.engine = engine
        self.scopes = ScopeOfThread()
        event.listen(engine, "do_connect", _connect_with_class)
        event.listen(engine, "begin", _on_begin)

    @contextmanager
    def write_session(self, session):
        """Start ``session``'s write transaction: it waits for the writers' advisory lock (other hosts' too)."""
        session.connection(execution_options={WRITE_OPTION: True})
        yield

    def schema_connection(self):
        """A connection whose transaction takes the writers' lock at BEGIN (for creating the schema)."""
        return self.engine.connect().execution_options(**{WRITE_OPTION: True})

    def grouped_write(self, work):
        """``work(connection)`` in a transaction of its own on a pooled connection; run again (up to RETRIES
        times) if PostgreSQL aborts it to break a deadlock or a serialization failure."""
        for attempt in itertools.count():
            try:
                return self._run_once(work)
            except _RETRYABLE as exc:
                if attempt == RETRIES:
                    raise
                log.info("transaction aborted by the database (%s), run again", type(exc).__name__)

    def _run_once(self, work):
        raw = self.engine.raw_connection()
        scope = self.scopes.enter()
        try:
            try:
                value = work(raw.driver_connection)
                scope.unit_ended(True)
                raw.driver_connection.commit()
            except BaseException:
                _undo(raw)
                raise
            scope.committed()
            return value
        finally:
            self.scopes.leave()
            raw.close()

    def transaction_scope(self) -> TransactionScope | None:
        """The scope of the grouped_write transaction this thread runs, or None outside one."""
        return self.scopes.current()

    @contextmanager
    def read_connection(self):
        """A pooled connection for the hot path's reads; its transaction ends when it returns to the pool."""
        raw = self.engine.raw_connection()
        try:
            yield raw.driver_connection
        finally:
            raw.close()

    def read_unless_changed(self, _key, read):
        """``read(connection)`` on a pooled connection, each time: a server's other clients leave no sign of
        their commits that would be cheaper than the read."""
        with self.read_connection() as connection:
            return read(connection)

    def dispose(self) -> None:
        """Close the pool's connections; new ones are opened at next use."""
        self.engine.dispose()

    def periodic_lock(self) -> "PeriodicLock":
        """The lock that makes one background worker of the KME run its periodic work."""
        return PeriodicLock(self.engine)

    def checkpoint(self) -> None:
        """Nothing: erased rows leave the table's pages when autovacuum reuses them (docs/security.md)."""

    def file_problem(self) -> str | None:
        """None: the database is a server's, not a file this process could see replaced."""
        return None

    def write_probe(self) -> str | None:
        """Try a small write on a fresh connection; the database error, or None if writes work."""
        try:
            with closing(_connect(self.engine.url.render_as_string(hide_password=False))) as connection:
                run(connection, _PROBE)
                connection.commit()
        except psycopg.Error as exc:
            # psycopg's first line names the failure; the next ones repeat the statement.
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None


def _connect_with_class(_dialect, _record, cargs, cparams):
    return Connection.connect(*cargs, **cparams)


def _on_begin(connection) -> None:
    if connection.get_execution_options().get(WRITE_OPTION):
        connection.execute(_TAKE_WRITERS)


def _undo(raw) -> None:
    """Roll back; a connection that cannot (it was lost) is dropped from the pool instead."""
    try:
        raw.driver_connection.rollback()
    except psycopg.Error:
        raw.invalidate()


def _connect(uri: str, **options) -> psycopg.Connection:
    """A psycopg connection to the database of ``uri``, outside any pool, with the parameters SQLAlchemy's engine
    would give it (several hosts, the query string's libpq options)."""
    _args, parameters = psycopg_dialect().create_connect_args(make_url(uri))
    return Connection.connect(**{"connect_timeout": CONNECT_TIMEOUT, "application_name": "kme", **parameters},
                              **options)


class PeriodicLock:
    """Whether this process runs the KME's periodic work: a session advisory lock on a connection of its own,
    taken when free and held while that connection lives; a lost connection loses it, for another host to take.
    """

    def __init__(self, engine):
        self._uri = engine.url.render_as_string(hide_password=False)
        self._connection: psycopg.Connection | None = None
        self._held = False

    def held(self) -> bool:
        try:
            if self._connection is None:
                self._connection = _connect(self._uri, autocommit=True)
            if self._held:
                # The lock lives as long as the session: a query that works proves both.
                run(self._connection, _ALIVE)
            else:
                self._held = run(self._connection, _TAKE_PERIODIC).fetchone()[0]
        except psycopg.Error:
            self.release()
        return self._held

    def release(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection, self._held = None, False


def read_meta(uri: str) -> dict[str, bytes]:
    """The kme_meta rows; empty before the schema exists, and when the server cannot be asked now (the
    process's first use of the database reports why)."""
    try:
        with closing(_connect(uri, autocommit=True)) as connection:
            return {name: bytes(value) for name, value in run(connection, READ_META)}
    except psycopg.Error:
        return {}
