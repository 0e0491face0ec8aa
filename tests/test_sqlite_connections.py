"""Connections kept out of SQLAlchemy's pool (kme.storage.sqlite_connections._Kept) on a real SQLite file, with real threads."""
import sqlite3
import threading

import pytest
from sqlalchemy import create_engine

from kme.storage import sqlite, sqlite_connections


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'kept.db'}")
    sqlite.install(engine)
    with sqlite_connections.read_connection(engine) as connection:
        connection.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY)")
    yield engine
    sqlite_connections.dispose(engine)


def _reader(engine) -> sqlite3.Connection:
    with sqlite_connections.read_connection(engine) as connection:
        return connection


def test_each_thread_keeps_its_own_connection_with_the_pragmas(engine):
    mine = _reader(engine)
    assert _reader(engine) is mine
    assert mine.execute("PRAGMA secure_delete").fetchone()[0] == 1
    found = []
    thread = threading.Thread(target=lambda: found.append(_reader(engine)))
    thread.start()
    thread.join(10)
    assert found and found[0] is not mine


def test_dispose_closes_every_kept_connection_and_the_next_use_opens_a_fresh_one(engine):
    old_reader = _reader(engine)
    sqlite_connections.group_commit(engine, lambda connection: connection.execute("INSERT INTO rows (id) VALUES (1)"))
    sqlite_connections.dispose(engine)
    with pytest.raises(sqlite3.ProgrammingError):
        old_reader.execute("SELECT 1")
    fresh = _reader(engine)
    assert fresh is not old_reader
    sqlite_connections.group_commit(engine, lambda connection: connection.execute("INSERT INTO rows (id) VALUES (2)"))
    assert [row[0] for row in fresh.execute("SELECT id FROM rows ORDER BY id")] == [1, 2]


def test_an_in_memory_database_is_read_through_the_pool(tmp_path):
    engine = create_engine("sqlite:///:memory:")
    sqlite.install(engine)
    with sqlite_connections.read_connection(engine) as connection:
        connection.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY)")
    sqlite_connections.group_commit(engine, lambda connection: connection.execute("INSERT INTO rows (id) VALUES (3)"))
    with sqlite_connections.read_connection(engine) as connection:
        assert connection.execute("SELECT id FROM rows").fetchall() == [(3,)]
    sqlite_connections.dispose(engine)
