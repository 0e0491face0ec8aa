"""Everything specific to SQLite, in one place (with kme.storage.backends.sqlite_connections) so that PostgreSQL can take
its place.

Pragmas on every connection, BEGIN IMMEDIATE for write transactions (so two
processes never both read and then both write), the single-statement claim,
the statements of the SAE hot path in sqlite3's own dialect, the database
file's identity, and WAL checkpoints.
"""
import os
import sqlite3
import time
import weakref
from contextlib import closing

from sqlalchemy import event, text

from kme.storage.pool_states import OURS, PEERS, RESERVED

WRITE_OPTION = "kme_write"
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

# One statement each: the rows leave the free pool in the same step that
# selects them, so no other process or thread can select them too. The index
# on (link_id, state, id) makes the inner SELECT a range scan of n rows.
# Host parameters per lookup, well under SQLite's limit of 32766.
_LOOKUP_CHUNK = 4096
# Rows of one multi-row INSERT: 5 columns x 500 stays far below SQLite's 32766 bound parameters.
_ROWS_PER_INSERT = 500

_FREE = f"SELECT id FROM pool_keys WHERE link_id = :link_id AND state = {OURS} ORDER BY id LIMIT :count"
_TAKE = f"DELETE FROM pool_keys WHERE id IN ({_FREE}) RETURNING id, file_id, position, material"
_RESERVE = (f"UPDATE pool_keys SET state = {RESERVED}, reservation = :reservation WHERE id IN ({_FREE}) "
            "RETURNING id, file_id, position, material")

# Lent keys come from the tail of the pool: the lender keeps its oldest keys.
_LEND = text(
    f"UPDATE pool_keys SET state = {PEERS} WHERE id IN (SELECT id FROM pool_keys WHERE link_id = :link_id "
    f"AND state = {OURS} ORDER BY id DESC LIMIT :count) RETURNING file_id, position"
)


# (device, inode) of the database file each engine of this process opened first.
# By engine, never by id(): an engine collected in a test process leaves its id to the next one.
_opened: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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
        path = database_path(engine)
        if path and engine not in _opened:
            found = os.stat(path)
            _opened[engine] = (found.st_dev, found.st_ino)

    @event.listens_for(engine, "begin")
    def on_begin(connection):
        immediate = connection.get_execution_options().get(WRITE_OPTION)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def driver(target) -> sqlite3.Connection:
    """The sqlite3 connection of ``target``: a Session inside a write transaction, or such a connection itself."""
    if isinstance(target, sqlite3.Connection):
        return target
    return target.connection().connection.driver_connection


def insert_pool_keys(target, rows) -> None:
    """Add (link_id, file_id, position, state, material) rows (any iterable) in one executemany (ingestion speed)."""
    driver(target).executemany(
        "INSERT INTO pool_keys (link_id, file_id, position, state, material) VALUES (?, ?, ?, ?, ?)", rows)


def insert_delivered(target, keys: list[tuple], slaves: list[tuple]) -> None:
    """Add delivered keys (key_id, link_id, master_sae_id, material, created_at) and their slaves
    (key_id, slave_sae_id), past SQLAlchemy: a request may hand out 128 keys."""
    connection = driver(target)
    insert_rows(connection, "INSERT INTO delivered_keys (key_id, link_id, master_sae_id, material, created_at)",
                "(?, ?, ?, ?, ?)", keys)
    insert_rows(connection, "INSERT INTO key_slaves (key_id, slave_sae_id, fetched)", "(?, ?, 0)", slaves)


def insert_rows(connection, head: str, row: str, rows: list[tuple]) -> None:
    """``head VALUES row, row, ...``: one statement per _ROWS_PER_INSERT rows, where executemany steps once a row.

    Every step releases the GIL, and the writer holds the writers' turn while
    other threads run: fewer steps, shorter turns.
    """
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start:start + _ROWS_PER_INSERT]
        connection.execute(f"{head} VALUES {','.join([row] * len(chunk))}", [value for item in chunk for value in item])


def _chunks(values: list):
    for start in range(0, len(values), _LOOKUP_CHUNK):
        chunk = values[start:start + _LOOKUP_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def delivered_keys_and_slaves(connection, key_ids: list[str]) -> list[tuple]:
    """(key_id, link_id, master_sae_id, material, slave_sae_id, fetched) for each slave of each delivered key
    among ``key_ids``: one statement where Get key with key IDs needs both."""
    rows = []
    for chunk, marks in _chunks(key_ids):
        rows += connection.execute(
            f"SELECT d.key_id, d.link_id, d.master_sae_id, d.material, s.slave_sae_id, s.fetched "
            f"FROM delivered_keys AS d "
            f"JOIN key_slaves AS s ON s.key_id = d.key_id WHERE d.key_id IN ({marks})", chunk).fetchall()
    return rows


def mark_fetched(connection, key_ids: list[str], slave_sae_id: int) -> None:
    """Record that one slave SAE has fetched ``key_ids``."""
    for chunk, marks in _chunks(key_ids):
        connection.execute(f"UPDATE key_slaves SET fetched = 1 WHERE slave_sae_id = ? AND key_id IN ({marks})",
                           [slave_sae_id, *chunk])


def delete_delivered(target, key_ids: list[str]) -> list[tuple]:
    """Delete delivered keys, and so their slave rows (ON DELETE CASCADE, foreign_keys=ON on every connection);
    (key_id, link_id, master_sae_id, material) of each key that was still there."""
    connection = driver(target)
    erased = []
    for chunk, marks in _chunks(key_ids):
        erased += connection.execute(f"DELETE FROM delivered_keys WHERE key_id IN ({marks}) "
                                     f"RETURNING key_id, link_id, master_sae_id, material", chunk).fetchall()
    return erased


def link_histogram(target, link_id: int) -> bytes:
    """The stored byte histogram of a link."""
    return driver(target).execute("SELECT byte_histogram FROM links WHERE peer_kme_id = ?", (link_id,)).fetchone()[0]


def update_link(target, link_id: int, deltas: dict[str, int], histogram: bytes | None) -> None:
    """Add ``deltas`` to a link's counters (column names from the code, never from input); store ``histogram``."""
    assignments = [f"{name} = {name} + ?" for name in deltas]
    values = list(deltas.values())
    if histogram is not None:
        assignments.append("byte_histogram = ?")
        values.append(histogram)
    if assignments:
        driver(target).execute(f"UPDATE links SET {', '.join(assignments)} WHERE peer_kme_id = ?",
                               [*values, link_id])


def link_row(connection, link_id: int, columns: tuple[str, ...]) -> tuple | None:
    """The named columns (from the code) of one link's row."""
    return connection.execute(f"SELECT {', '.join(columns)} FROM links WHERE peer_kme_id = ?", (link_id,)).fetchone()


def insert_events(target, rows: list[tuple]) -> None:
    """Add (created_at, message) event rows in one statement."""
    insert_rows(driver(target), "INSERT INTO events (created_at, message)", "(?, ?)", rows)


def add_fingerprints(target, fingerprints) -> set[int]:
    """Store distinct fingerprints (any collection); returns those stored before (whose keys must be refused).

    The usual case costs one executemany: INSERT OR IGNORE, whose row count
    says whether any fingerprint was known. Only then is it undone to a
    savepoint, the known ones looked up, and the others inserted. Sorted,
    the inserts fill the index's pages one after another.
    """
    ordered = sorted(fingerprints)
    if not ordered:
        return set()
    connection = driver(target)
    connection.execute("SAVEPOINT fingerprints")
    inserted = connection.executemany("INSERT OR IGNORE INTO key_fingerprints (fingerprint) VALUES (?)",
                                      zip(ordered)).rowcount
    if inserted == len(ordered):
        connection.execute("RELEASE fingerprints")
        return set()
    connection.execute("ROLLBACK TO fingerprints")
    connection.execute("RELEASE fingerprints")
    known = set()
    for chunk, marks in _chunks(ordered):
        known.update(row[0] for row in connection.execute(
            f"SELECT fingerprint FROM key_fingerprints WHERE fingerprint IN ({marks})", chunk))
    connection.executemany("INSERT INTO key_fingerprints (fingerprint) VALUES (?)",
                           zip(fingerprint for fingerprint in ordered if fingerprint not in known))
    return known


def take_pool_keys(connection, link_id: int, count: int) -> list[tuple]:
    """Remove up to ``count`` free keys of the link's pool, lowest ids first; (file_id, position, material) of
    each in id order."""
    rows = connection.execute(_TAKE, {"link_id": link_id, "count": count}).fetchall()
    rows.sort()
    return [row[1:] for row in rows]


def reserve_pool_keys(target, link_id: int, count: int, reservation: str) -> list[tuple]:
    """Mark up to ``count`` free keys of the link as reserved for ``reservation``;
    (id, file_id, position, material) of each, in id order."""
    rows = driver(target).execute(_RESERVE, {"link_id": link_id, "count": count,
                                             "reservation": reservation}).fetchall()
    rows.sort()
    return rows


def remove_reserved(target, reservation: str) -> list[tuple]:
    """Delete the pool keys reserved for ``reservation``; (file_id, position, material) of each."""
    return driver(target).execute("DELETE FROM pool_keys WHERE reservation = ? RETURNING file_id, position, material",
                                  (reservation,)).fetchall()


def file_names(target, file_ids) -> dict[int, str]:
    """The names of key files by ID."""
    ids = list(file_ids)
    return dict(row for chunk, marks in _chunks(ids) for row in driver(target).execute(
        f"SELECT id, name FROM key_files WHERE id IN ({marks})", chunk))


def file_ids(target, link_id: int, names) -> dict[str, int]:
    """The IDs of the link's key files by name (names not found are left out)."""
    wanted = list(names)
    return dict(row for chunk, marks in _chunks(wanted) for row in driver(target).execute(
        f"SELECT name, id FROM key_files WHERE link_id = ? AND name IN ({marks})", [link_id, *chunk]))


def pool_keys_at(target, positions: dict[int, list[int]]) -> list[tuple]:
    """(id, link_id, state, file_id, position, material) of the pool keys at the given positions of each file.

    One index search on (file_id, position) per position (row values in IN
    lists are not indexable in SQLite), whatever the pool size.
    """
    connection = driver(target)
    rows = []
    for file_id, wanted in positions.items():
        for chunk, marks in _chunks(wanted):
            rows += connection.execute(f"SELECT id, link_id, state, file_id, position, material FROM pool_keys "
                                       f"WHERE file_id = ? AND position IN ({marks})", [file_id, *chunk]).fetchall()
    return rows


def delete_pool_keys(target, ids: list[int]) -> None:
    """Delete pool keys by ID."""
    for chunk, marks in _chunks(ids):
        driver(target).execute(f"DELETE FROM pool_keys WHERE id IN ({marks})", chunk)


def any_delivered(target, key_ids: list[str]) -> bool:
    """Whether a delivered key has one of ``key_ids``."""
    return any(driver(target).execute(f"SELECT 1 FROM delivered_keys WHERE key_id IN ({marks}) LIMIT 1",
                                      chunk).fetchone() for chunk, marks in _chunks(key_ids))


def insert_outgoing(target, activation_id: str, link_id: int, state: str, created_at: str, request: str) -> None:
    """Record an activation this KME asks of a peer."""
    driver(target).execute("INSERT INTO outgoing_activations (activation_id, link_id, state, created_at, request) "
                           "VALUES (?, ?, ?, ?, ?)", (activation_id, link_id, state, created_at, request))


def take_outgoing(target, activation_id: str, states: tuple[str, ...]) -> tuple | None:
    """Delete an outgoing activation if it is in one of ``states``; its (link_id, request), or None."""
    return driver(target).execute(
        f"DELETE FROM outgoing_activations WHERE activation_id = ? AND state IN ({','.join('?' * len(states))}) "
        "RETURNING link_id, request", (activation_id, *states)).fetchone()


def incoming_activation(target, activation_id: str) -> tuple | None:
    """(link_id, state, key_ids) of an activation a peer asked of this KME, or None."""
    return driver(target).execute("SELECT link_id, state, key_ids FROM incoming_activations WHERE activation_id = ?",
                                  (activation_id,)).fetchone()


def insert_incoming(target, activation_id: str, link_id: int, state: str, key_ids: str, created_at: str) -> None:
    """Remember an activation a peer asked of this KME."""
    driver(target).execute("INSERT INTO incoming_activations (activation_id, link_id, state, key_ids, created_at) "
                           "VALUES (?, ?, ?, ?, ?)", (activation_id, link_id, state, key_ids, created_at))


def lend_pool_keys(connection, link_id: int, count: int) -> list:
    """Move up to ``count`` free keys of the link to the peer's direction, newest first; returns (file_id, position)."""
    return connection.execute(_LEND, {"link_id": link_id, "count": count}).all()


def any_pool_key(connection) -> bool:
    """Whether the pool holds any key."""
    return connection.execute("SELECT 1 FROM pool_keys LIMIT 1").fetchone() is not None


def all_delivered(connection) -> list[tuple]:
    """(key_id, link_id, master_sae_id, material) of every delivered key (once, when a data key is made)."""
    return connection.execute("SELECT key_id, link_id, master_sae_id, material FROM delivered_keys").fetchall()


def replace_delivered_material(connection, rows: list[tuple]) -> None:
    """Store (material, key_id) rows' material."""
    connection.executemany("UPDATE delivered_keys SET material = ? WHERE key_id = ?", rows)


def all_histograms(connection) -> list[tuple]:
    """(link_id, byte_histogram) of every link."""
    return connection.execute("SELECT peer_kme_id, byte_histogram FROM links").fetchall()


def store_histogram(connection, link_id: int, histogram: bytes) -> None:
    """Store a link's byte histogram."""
    connection.execute("UPDATE links SET byte_histogram = ? WHERE peer_kme_id = ?", (histogram, link_id))


def clear_pool_keys(connection, after_id: int, limit: int) -> list[tuple]:
    """(id, link_id, file_id, position, material) of up to ``limit`` pool keys stored in clear (32 bytes) with
    IDs above ``after_id``, in ID order: a range scan of the primary key."""
    return connection.execute("SELECT id, link_id, file_id, position, material FROM pool_keys "
                              "WHERE id > ? AND length(material) = 32 ORDER BY id LIMIT ?",
                              (after_id, limit)).fetchall()


def count_clear_pool_keys(connection) -> int:
    """How many pool keys are stored in clear (a scan of the pool: for flask encrypt-db's progress only)."""
    return connection.execute("SELECT count(*) FROM pool_keys WHERE length(material) = 32").fetchone()[0]


def replace_pool_material(connection, rows: list[tuple]) -> None:
    """Store (material, id) rows' material."""
    connection.executemany("UPDATE pool_keys SET material = ? WHERE id = ?", rows)


def meta_names(engine) -> set[str]:
    """The names kme_meta holds as committed now (a connection outside the caller's transaction)."""
    raw = engine.raw_connection()
    try:
        return {row[0] for row in raw.cursor().execute("SELECT name FROM kme_meta")}
    finally:
        raw.close()


def read_meta(path: str) -> dict[str, bytes]:
    """The kme_meta rows of the database file at ``path``, read-only; empty before the schema exists, and when the
    file cannot be read now (the process's first use of the database reports why)."""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as raw:
            return dict(raw.execute("SELECT name, value FROM kme_meta").fetchall())
    except sqlite3.Error:
        return {}


def checkpoint(engine) -> None:
    """Copy the WAL into the database and truncate it, so erased key bytes leave the -wal file.

    Runs outside any transaction (a transaction's snapshot would pin the WAL).
    """
    raw = engine.raw_connection()
    try:
        raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        raw.close()


def database_path(engine) -> str | None:
    """The database file of ``engine`` (None in memory)."""
    database = engine.url.database
    return None if not database or database == ":memory:" else database


def path_of_uri(uri: str) -> str | None:
    """The database file a ``sqlite:///path`` URI names (None in memory)."""
    database = uri.removeprefix("sqlite:///")
    return None if not database or database == ":memory:" else database


def file_problem(engine) -> str | None:
    """Why the database file this process uses is no longer the one at its path, or None.

    A deleted or replaced file would otherwise go on taking writes that
    nobody will ever read again, or hand out keys again from a fresh file.
    """
    path = database_path(engine)
    opened = _opened.get(engine)
    if path is None or opened is None:
        return None
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return f"the database file {path} was deleted while the KME was running; restart it"
    except OSError as exc:
        return f"the database file {path} cannot be checked ({exc.strerror})"
    if (found.st_dev, found.st_ino) != opened:
        return f"the database file {path} was replaced while the KME was running; restart it"
    return None


def write_probe(engine) -> str | None:
    """Try a small write on a fresh connection; the database error, or None if writes work.

    A fresh connection sees the file as it is now (a pooled one may have been
    opened read-only, or point at a deleted file); ``mode=rw`` never creates
    a missing file.
    """
    path = database_path(engine)
    if path is None:
        return None
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=2, isolation_level=None)) as raw:
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("INSERT OR REPLACE INTO heartbeats (name, beat_at) VALUES ('healthz-probe', ?)",
                        (time.time(),))
            raw.execute("COMMIT")
    except sqlite3.Error as exc:
        return str(exc)
    return None


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
