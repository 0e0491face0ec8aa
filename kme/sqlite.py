"""Everything specific to SQLite, in one place so that PostgreSQL can take its place.

Pragmas on every connection, BEGIN IMMEDIATE for write transactions (so two
processes never both read and then both write), the single-statement claim,
and WAL checkpoints.
"""
from sqlalchemy import event, text

WRITE_OPTION = "kme_write"

_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA synchronous=FULL",
    # Consumed key bytes are overwritten in the database file, not just unlinked.
    "PRAGMA secure_delete=ON",
    "PRAGMA foreign_keys=ON",
)

# One statement each: the rows leave the free pool in the same step that
# selects them, so no other process or thread can select them too. The index
# on (link_id, state, id) makes the inner SELECT a range scan of n rows.
_FREE = "SELECT id FROM pool_keys WHERE link_id = :link_id AND state = 0 ORDER BY id LIMIT :count"
_TAKE = text(f"DELETE FROM pool_keys WHERE id IN ({_FREE}) RETURNING id, file_id, position, material")
_RESERVE = text(
    f"UPDATE pool_keys SET state = 2, reservation = :reservation WHERE id IN ({_FREE}) "
    "RETURNING id, file_id, position, material"
)


def install(engine) -> None:
    """Set the pragmas on each new connection and take over BEGIN from pysqlite."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        # pysqlite's own transaction handling would issue a plain deferred
        # BEGIN lazily; we issue BEGIN ourselves in on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in _PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection):
        immediate = connection.get_execution_options().get(WRITE_OPTION)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def insert_pool_keys(connection, rows: list[tuple]) -> None:
    """Add (link_id, file_id, position, state, material) rows in one executemany, past the ORM (ingestion speed)."""
    connection.exec_driver_sql(
        "INSERT INTO pool_keys (link_id, file_id, position, state, material) VALUES (?, ?, ?, ?, ?)", rows)


def take_pool_keys(connection, link_id: int, count: int) -> list:
    """Remove up to ``count`` free keys of the link's pool, lowest ids first; returns them in id order."""
    rows = connection.execute(_TAKE, {"link_id": link_id, "count": count}).all()
    return sorted(rows, key=lambda row: row.id)


def reserve_pool_keys(connection, link_id: int, count: int, reservation: str) -> list:
    """Mark up to ``count`` free keys of the link as reserved for ``reservation``; returns them in id order."""
    rows = connection.execute(_RESERVE, {"link_id": link_id, "count": count, "reservation": reservation}).all()
    return sorted(rows, key=lambda row: row.id)


def checkpoint(engine) -> None:
    """Copy the WAL into the database and truncate it, so erased key bytes leave the -wal file.

    Runs outside any transaction (a transaction's snapshot would pin the WAL).
    """
    raw = engine.raw_connection()
    try:
        raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        raw.close()
