"""The database handle, schema creation and identity, and the write transaction every writer uses."""
import gc
import uuid
import weakref
from contextlib import contextmanager

from flask import current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import insert, inspect, select
from sqlalchemy.orm import DeclarativeBase

from kme.errors import StorageFailure
from kme.storage import at_rest, backends, migrations
from kme.storage.meta_names import DATABASE_ID


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

_schema_ready: "weakref.WeakSet" = weakref.WeakSet()
_meta: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def init_app(app, database_uri: str, threads: int) -> None:
    """Bind the database to the app, with connections for ``threads`` threads per process; nothing is opened
    until first use."""
    backend = backends.for_uri(database_uri)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_uri
    # SQL errors are logged; their parameters may hold key material.
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"hide_parameters": True, **backend.engine_options(threads)}
    db.init_app(app)
    with app.app_context():
        backend.install(db.engine)


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
    with backends.of(db.engine).write_session(session):
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
    return backends.of(db.engine).grouped_write(db.engine, work)


def read_connection():
    """A context manager giving this thread's driver connection for reads past SQLAlchemy (the hot path)."""
    return backends.of(db.engine).read_connection(db.engine)


def ensure_schema() -> bool:
    """Create the schema of a new database (at the newest version), the database's identity and data key, and link
    rows, once per process, and open the data key; True the first time.

    Runs exclusively (the backend's schema_connection), so processes starting together do not race.
    StorageFailure if the database is at another version of the schema (`flask db upgrade` upgrades it), or if
    the process's KEK does not open the data key.
    """
    from kme.storage.keystore import intake
    from kme.storage.models import Meta

    engine = db.engine
    if engine in _schema_ready:
        return False
    with backends.of(engine).schema_connection(engine) as connection:
        with connection.begin():
            found = migrations.version(connection)
            if found is None:
                db.metadata.create_all(connection)
                migrations.stamp_head(connection)
            elif problem := migrations.problem(found):
                raise StorageFailure(problem)
            _check_columns(connection)
            known = set(connection.scalars(select(Meta.name)))
            if DATABASE_ID not in known:
                connection.execute(insert(Meta).values(name=DATABASE_ID, value=uuid.uuid4().hex.encode()))
            facts = dict(connection.execute(select(Meta.name, Meta.value)).all())
            at_rest.establish(connection, engine, current_app.extensions["kme_kek"], facts)
            _meta[engine] = dict(connection.execute(select(Meta.name, Meta.value)).all())
    intake.ensure_links(current_app.extensions["kme"].key_directories())
    _schema_ready.add(engine)
    return True


def _check_columns(connection) -> None:
    """StorageFailure if a table lacks a column of the models: the database was made by an older KME.

    create_all() adds missing tables, never missing columns; without this a
    request would fail later on an SQL error naming the column.
    """
    inspector = inspect(connection)
    for table in db.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing = [column.name for column in table.columns if column.name not in present]
        if missing:
            raise StorageFailure(f"the database was created by an older version of the KME (table {table.name} has "
                                 f"no column {missing[0]}); see docs/deployment.md, Upgrading")


def meta(name: str) -> bytes | None:
    """A fact about this database (DATABASE_ID, FINGERPRINT_SECRET), or None before the schema exists.

    Read once per process, on a connection of its own, so that it never
    touches a transaction of the caller's.
    """
    from kme.storage.models import Meta

    engine = db.engine
    if engine not in _meta:
        with engine.connect() as connection:
            facts = dict(connection.execute(select(Meta.name, Meta.value)).all())
        if not facts:
            return None
        _meta[engine] = facts
    return _meta[engine].get(name)


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
    backends.of(db.engine).dispose(db.engine)
    gc.collect()


def check_database_file() -> None:
    """StorageFailure if the database file was deleted or replaced under this process."""
    problem = backends.of(db.engine).file_problem(db.engine)
    if problem:
        raise StorageFailure(problem)
