"""The database handle, schema creation, and the write transaction every writer uses."""
import weakref
from contextlib import contextmanager

from flask import current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from kme import sqlite


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

_schema_ready: "weakref.WeakSet" = weakref.WeakSet()


def init_app(app, database_uri: str) -> None:
    """Bind the database to the app; nothing is opened until first use."""
    app.config["SQLALCHEMY_DATABASE_URI"] = database_uri
    # SQL errors are logged; their parameters may hold key material.
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"hide_parameters": True}
    db.init_app(app)
    with app.app_context():
        sqlite.install(db.engine)


@contextmanager
def write_transaction():
    """A session transaction that holds the database write lock from its first statement.

    Commits on success, rolls back on any exception. Must be the first thing a
    unit of work does: a read before it would start a plain transaction.
    """
    session = db.session()
    if session.in_transaction():
        raise RuntimeError("write_transaction() started inside an open transaction")
    session.connection(execution_options={sqlite.WRITE_OPTION: True})
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise


def ensure_schema() -> bool:
    """Create missing tables and link rows once per process; True the first time.

    Runs under the write lock, so processes starting together do not race.
    """
    from kme.keystore import intake

    engine = db.engine
    if engine in _schema_ready:
        return False
    with engine.connect().execution_options(**{sqlite.WRITE_OPTION: True}) as connection:
        with connection.begin():
            db.metadata.create_all(connection)
    intake.ensure_links(current_app.extensions["kme"].key_directories())
    _schema_ready.add(engine)
    return True
