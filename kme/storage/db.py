"""The storage of an app (its one Storage object), the write transaction every writer uses, and the
database's facts (kme_meta).

The schema is made by kme.storage.schema, which stands above this module:
here nothing imports the tables or the key store.
"""
import gc
from contextlib import contextmanager

from flask import current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import column, select, table
from sqlalchemy.orm import DeclarativeBase

from kme.errors import StorageFailure
from kme.storage import backends
from kme.storage.backends.transaction_scope import TransactionScope


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

# kme_meta as Core sees it without the models (which import this module).
_META = table("kme_meta", column("name"), column("value"))
_READ_META = select(_META.c.name, _META.c.value)


class Storage:
    """The database of one app and all that its process keeps about it, made once by init_app and held in
    ``app.extensions["kme_storage"]``: the engine, its backend (for SQLite: the file's identity, the writers'
    turn, the group commit, the connections kept past the pool), the database's facts once read, whether the
    schema is ready, and the data key's state (kme.storage.at_rest.Store) once opened."""

    def __init__(self, engine, backend_module):
        self.engine = engine
        self.backend = backend_module.Backend(engine)
        self.facts: dict[str, bytes] | None = None
        self.schema_ready = False
        self.at_rest = None


def init_app(app, database_uri: str, threads: int) -> None:
    """Bind the database to the app, with connections for ``threads`` threads per process, and make its Storage;
    nothing is opened until first use."""
    backend = backends.for_uri(database_uri)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_uri
    # SQL errors are logged; their parameters may hold key material.
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"hide_parameters": True, **backend.engine_options(threads)}
    db.init_app(app)
    with app.app_context():
        app.extensions["kme_storage"] = Storage(db.engine, backend)


def storage() -> Storage:
    """The current app's Storage."""
    return current_app.extensions["kme_storage"]


@contextmanager
def write_transaction():
    """A session transaction, exclusive among the KME's write transactions from its first statement (the
    backend's write_session).

    Commits on success, rolls back on any exception. Must be the first thing a
    unit of work does: a read before it would start a plain transaction.
    """
    session = db.session()
    if session.in_transaction():
        raise RuntimeError("write_transaction() started inside an open transaction")
    check_database_file()
    with storage().backend.write_session(session):
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def grouped_write(work):
    """``work(connection)`` in a write transaction of the hot path; its value once committed.

    ``work`` gets a driver connection (use kme.storage.statements) and may run
    on another caller's thread, with other callers' work in the same
    transaction (SQLite's group commit), or again after a transaction the
    engine aborted (a PostgreSQL deadlock): it changes nothing but the
    database. Only for requests: the app's before_request hook has checked
    the database file for this request (check_database_file), so it is not
    checked again here.
    """
    return storage().backend.grouped_write(work)


def transaction_scope() -> TransactionScope | None:
    """The scope of the grouped_write transaction whose units this thread runs (values read once for all its
    units, actions once it committed), or None outside one."""
    return storage().backend.transaction_scope()


def read_unless_changed(key, read):
    """``read(connection)`` for the hot path, or, on SQLite, the value it gave last for ``key`` in this thread if
    nothing was committed to the database since: exact, without reading a table (Get status, Get entropy)."""
    return storage().backend.read_unless_changed(key, read)


def read_connection():
    """A context manager giving this thread's driver connection for reads past SQLAlchemy (the hot path)."""
    return storage().backend.read_connection()


def meta(name: str) -> bytes | None:
    """A fact about this database (DATABASE_ID, FINGERPRINT_SECRET), or None before the schema exists.

    Read once per process, on a connection of its own, so that it never
    touches a transaction of the caller's.
    """
    found = storage()
    if found.facts is None:
        with found.engine.connect() as connection:
            facts = dict(connection.execute(_READ_META).all())
        if not facts:
            return None
        found.facts = facts
    return found.facts.get(name)


def remember_meta(connection) -> None:
    """Keep the database's facts as ``connection`` reads them now (the schema's transaction, once it made
    them)."""
    storage().facts = dict(connection.execute(_READ_META).all())


def reset_connections() -> None:
    """Drop pooled connections and those kept per thread, so that the next use opens fresh ones (after a storage
    fault).

    A connection that is not closed explicitly (one checked out by another
    thread while the pool is disposed) is freed only by the garbage
    collector: each sqlite3 connection is in a reference cycle with its
    statement cache. SQLite shares its state of a file among all of a
    process's connections to it, so one such connection left open on a file
    opened read-only keeps new ones read-only. Collecting now closes those
    (the collector runs seldom in the web workers, kme.operations.collector).
    """
    storage().backend.dispose()
    gc.collect()


def check_database_file() -> None:
    """StorageFailure if the database file was deleted or replaced under this process."""
    problem = storage().backend.file_problem()
    if problem:
        raise StorageFailure(problem)
