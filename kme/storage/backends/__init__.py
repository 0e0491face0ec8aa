"""The database engines the KME runs on, one module each, behind one interface (the forms of their URIs are
kme.database_uris').

A backend module provides:

- ``DRIVER_ERRORS``, its driver's exceptions; ``failure_cause(error)``, one
  key-free line for an error;
- ``engine_options(threads)`` for SQLAlchemy's engine and ``install(engine)``,
  hooks on its connections; driver connections have an ``sql`` attribute:
  the SQLAlchemy dialect the statements are compiled for (``dialect``,
  kme.storage.compiled) and what the engine does its own way
  (``lock_name(connection, name)``, ``add_fingerprints(connection, ordered,
  chunk)``);
- ``write_session(session)``, a context manager that starts a session's write
  transaction, exclusive among the write sessions of the KME;
  ``schema_connection(engine)``, a connection whose transaction is exclusive
  among the processes creating the schema;
- ``grouped_write(engine, work)``, the hot path's write transaction, and
  ``read_connection(engine)``, its reads; ``dispose(engine)``;
- ``periodic_lock(engine)``: an object whose ``held()`` says whether this
  process runs the KME's periodic work (taking the lock when it is free) and
  whose ``release()`` gives it up;
- ``file_problem(engine)``, ``write_probe(engine)``: the health checks;
  ``read_meta(uri)``: the kme_meta rows before the app exists (the KEK check
  at start); ``checkpoint(engine)``: erased key bytes leave the engine's log.
"""
import importlib

from kme.database_uris import scheme_of

INTERFACE = ("DRIVER_ERRORS", "failure_cause", "engine_options", "install",
             "write_session", "schema_connection", "grouped_write", "read_connection", "dispose", "periodic_lock",
             "file_problem", "write_probe", "read_meta", "checkpoint")
SQL_INTERFACE = ("dialect", "lock_name", "add_fingerprints")
_MODULES = {"sqlite": "kme.storage.backends.sqlite", "postgresql": "kme.storage.backends.postgresql"}
_loaded: dict = {}


def _named(name: str):
    # Imported on first use: a KME on SQLite never loads the PostgreSQL driver.
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module


def for_uri(uri: str):
    """The backend module of a database URI; KeyError for an engine the KME does not run on."""
    return _named(scheme_of(uri))


def of(engine):
    """The backend module of a SQLAlchemy engine."""
    return _named(engine.dialect.name)

