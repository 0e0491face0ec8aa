"""The database engines the KME runs on, one module each, behind one interface (the forms of their URIs are
kme.database_uris').

A backend module provides:

- ``DRIVER_ERRORS``, its driver's exceptions; ``failure_cause(error)``, one
  key-free line for an error; ``engine_options(threads)`` for SQLAlchemy's
  engine; ``read_meta(uri)``: the kme_meta rows before the app exists (the
  KEK check at start). Driver connections have an ``sql`` attribute: the
  SQLAlchemy dialect the statements are compiled for (``dialect``,
  kme.storage.compiled) and what the engine does its own way
  (``lock_name(connection, name)``, ``add_fingerprints(connection, ordered,
  chunk)``).
- ``Backend(engine)``, made once per app by its storage (kme.storage.db.Storage):
  it installs its hooks on the engine's connections and holds what the
  process keeps about the database (for SQLite: the file's identity, the
  writers' turn, the group commit, the connections kept past the pool). It
  has ``DRIVER_ERRORS`` and ``failure_cause`` too, and:
  ``write_session(session)``, a context manager that starts a session's
  write transaction, exclusive among the write sessions of the KME;
  ``schema_connection()``, a connection whose transaction is exclusive among
  the processes creating the schema; ``grouped_write(work)``, the hot path's
  write transaction, and ``read_connection()``, its reads;
  ``read_unless_changed(key, read)``, a read the engine may answer from the
  last one while nothing was committed since (Get status, Get entropy);
  ``dispose()``;
  ``periodic_lock()``: an object whose ``held()`` says whether this process
  runs the KME's periodic work (taking the lock when it is free) and whose
  ``release()`` gives it up; ``file_problem()``, ``write_probe()``: the
  health checks; ``checkpoint()``: erased key bytes leave the engine's log.
"""
import importlib

from kme.database_uris import scheme_of

INTERFACE = ("DRIVER_ERRORS", "failure_cause", "engine_options", "read_meta", "Backend")
BACKEND_INTERFACE = ("DRIVER_ERRORS", "failure_cause", "write_session", "schema_connection", "grouped_write",
                     "read_connection", "read_unless_changed", "dispose", "periodic_lock", "file_problem",
                     "write_probe", "checkpoint")
SQL_INTERFACE = ("dialect", "lock_name", "add_fingerprints")
_MODULES = {"sqlite": "kme.storage.backends.sqlite", "postgresql": "kme.storage.backends.postgresql"}


def for_uri(uri: str):
    """The backend module of a database URI (imported at first use: a KME on SQLite never loads the PostgreSQL
    driver); KeyError for an engine the KME does not run on."""
    return importlib.import_module(_MODULES[scheme_of(uri)])
