"""The statements of the key store that run past SQLAlchemy (the hot path, ingestion), for every engine.

They run on a driver connection of a backend (kme.storage.backends): its
``execute`` and ``executemany`` take ``?`` parameters, and its ``sql``
attribute holds what the engine spells its own way (the claims, row locks,
the fingerprint insert). Only the kme.storage package calls these.
"""

from kme.storage.pool_states import OURS, PEERS, RESERVED

# Host parameters per lookup: well under SQLite's limit of 32766 and PostgreSQL's of 65535.
_LOOKUP_CHUNK = 4096
# Rows of one multi-row INSERT: 5 columns x 500 stays far below either limit of bound parameters.
_ROWS_PER_INSERT = 500


def claims(lock: str) -> tuple[str, str, str]:
    """The take, reserve and lend statements, ``lock`` added to the SELECT of the rows they change.

    One statement each: the rows leave the free pool in the same step that
    selects them, so no other transaction can select them too. The index on
    (link_id, state, id) makes the inner SELECT a range scan of n rows.
    Lent keys come from the tail of the pool: the lender keeps its oldest keys.
    """
    free = f"SELECT id FROM pool_keys WHERE link_id = ? AND state = {OURS} ORDER BY id LIMIT ?{lock}"
    newest = f"SELECT id FROM pool_keys WHERE link_id = ? AND state = {OURS} ORDER BY id DESC LIMIT ?{lock}"
    return (f"DELETE FROM pool_keys WHERE id IN ({free}) RETURNING id, file_id, position, material",
            f"UPDATE pool_keys SET state = {RESERVED}, reservation = ? WHERE id IN ({free}) "
            "RETURNING id, file_id, position, material",
            f"UPDATE pool_keys SET state = {PEERS} WHERE id IN ({newest}) RETURNING file_id, position")


def driver(target):
    """The driver connection of ``target``: a Session inside a write transaction, or such a connection itself."""
    if hasattr(target, "sql"):
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
    insert_rows(connection, "INSERT INTO key_slaves (key_id, slave_sae_id, fetched)", "(?, ?, FALSE)", slaves)


def insert_rows(connection, head: str, row: str, rows: list[tuple]) -> None:
    """``head VALUES row, row, ...``: one statement per _ROWS_PER_INSERT rows, where executemany steps once a row.

    Every step releases the GIL, and a writer holds its locks while other
    threads run: fewer steps, shorter turns.
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
    among ``key_ids``: one statement where Get key with key IDs needs both. The rows stay locked until the
    transaction ends (where the engine locks rows), so two concurrent fetches never both find a key unfetched."""
    rows = []
    for chunk, marks in _chunks(key_ids):
        rows += connection.execute(
            f"SELECT d.key_id, d.link_id, d.master_sae_id, d.material, s.slave_sae_id, s.fetched "
            f"FROM delivered_keys AS d "
            f"JOIN key_slaves AS s ON s.key_id = d.key_id WHERE d.key_id IN ({marks}){connection.sql.ROW_LOCK}",
            chunk).fetchall()
    return rows


def mark_fetched(connection, key_ids: list[str], slave_sae_id: int) -> None:
    """Record that one slave SAE has fetched ``key_ids``."""
    for chunk, marks in _chunks(key_ids):
        connection.execute(f"UPDATE key_slaves SET fetched = TRUE WHERE slave_sae_id = ? AND key_id IN ({marks})",
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
    """The stored byte histogram of a link, its row locked until the transaction ends (it is written back)."""
    connection = driver(target)
    return connection.execute(f"SELECT byte_histogram FROM links WHERE peer_kme_id = ?{connection.sql.ROW_LOCK}",
                              (link_id,)).fetchone()[0]


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


def spent_total(connection) -> int:
    """Keys of every link whose fate is final (delivered, discarded, set aside): a sum that only grows."""
    # PostgreSQL sums bigints as numeric (a Decimal).
    return int(driver(connection).execute("SELECT COALESCE(SUM(delivered + discarded + set_aside), 0) FROM links"
                                          ).fetchone()[0])


def link_row(connection, link_id: int, columns: tuple[str, ...]) -> tuple | None:
    """The named columns (from the code) of one link's row."""
    return connection.execute(f"SELECT {', '.join(columns)} FROM links WHERE peer_kme_id = ?", (link_id,)).fetchone()


def insert_events(target, rows: list[tuple]) -> None:
    """Add (created_at, message) event rows in one statement."""
    insert_rows(driver(target), "INSERT INTO events (created_at, message)", "(?, ?)", rows)


def add_fingerprints(target, fingerprints) -> set[int]:
    """Store distinct fingerprints (any collection); returns those stored before (whose keys must be refused).

    Sorted, the inserts fill the index's pages one after another.
    """
    ordered = sorted(fingerprints)
    if not ordered:
        return set()
    connection = driver(target)
    return connection.sql.add_fingerprints(connection, ordered, _chunks)


def take_pool_keys(connection, link_id: int, count: int) -> list[tuple]:
    """Remove up to ``count`` free keys of the link's pool, lowest ids first; (file_id, position, material) of
    each in id order."""
    rows = connection.execute(connection.sql.TAKE, (link_id, count)).fetchall()
    rows.sort()
    return [row[1:] for row in rows]


def reserve_pool_keys(target, link_id: int, count: int, reservation: str) -> list[tuple]:
    """Mark up to ``count`` free keys of the link as reserved for ``reservation``;
    (id, file_id, position, material) of each, in id order."""
    connection = driver(target)
    rows = connection.execute(connection.sql.RESERVE, (reservation, link_id, count)).fetchall()
    rows.sort()
    return rows


def remove_reserved(target, link_id: int, reservation: str) -> list[tuple]:
    """Delete the link's pool keys reserved for ``reservation``; (file_id, position, material) of each.

    ``+link_id`` keeps SQLite from searching the link's index, which walks
    every key of the link, instead of the reservation's (PostgreSQL takes it
    as plain ``link_id``).
    """
    return driver(target).execute("DELETE FROM pool_keys WHERE reservation = ? AND +link_id = ? "
                                  "RETURNING file_id, position, material", (reservation, link_id)).fetchall()


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
    """(id, link_id, state, file_id, position, material) of the pool keys at the given positions of each file,
    locked until the transaction ends (where the engine locks rows).

    One index search on (file_id, position) per position (row values in IN
    lists are not indexable in SQLite), whatever the pool size.
    """
    connection = driver(target)
    rows = []
    for file_id, wanted in positions.items():
        for chunk, marks in _chunks(wanted):
            rows += connection.execute(f"SELECT id, link_id, state, file_id, position, material FROM pool_keys "
                                       f"WHERE file_id = ? AND position IN ({marks}){connection.sql.ROW_LOCK}",
                                       [file_id, *chunk]).fetchall()
    return rows


def delete_pool_keys(target, ids: list[int]) -> None:
    """Delete pool keys by ID."""
    for chunk, marks in _chunks(ids):
        driver(target).execute(f"DELETE FROM pool_keys WHERE id IN ({marks})", chunk)


def any_delivered(target, key_ids: list[str]) -> bool:
    """Whether a delivered key has one of ``key_ids``."""
    return any(driver(target).execute(f"SELECT 1 FROM delivered_keys WHERE key_id IN ({marks}) LIMIT 1",
                                      chunk).fetchone() for chunk, marks in _chunks(key_ids))


def lock_name(target, name: str) -> None:
    """Hold a lock on ``name`` until the transaction ends, so that transactions about one thing (an activation)
    run one after the other wherever they run (SQLite's write lock already does so)."""
    connection = driver(target)
    connection.sql.lock_name(connection, name)


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


def insert_incoming(target, activation_id: str, link_id: int, state: str, key_ids: str, created_at: str,
                    relay: str | None = None) -> None:
    """Remember an activation a peer asked of this KME (``relay``: what a relay passed on, as JSON)."""
    driver(target).execute("INSERT INTO incoming_activations (activation_id, link_id, state, key_ids, created_at, "
                           "relay) VALUES (?, ?, ?, ?, ?, ?)", (activation_id, link_id, state, key_ids, created_at,
                                                               relay))


def incoming_relay(target, activation_id: str) -> tuple | None:
    """(state, relay) of a relay a peer asked of this KME, or None."""
    return driver(target).execute("SELECT state, relay FROM incoming_activations WHERE activation_id = ? AND "
                                  "relay IS NOT NULL", (activation_id,)).fetchone()


def set_incoming_relay(target, activation_id: str, state: str, relay: str, expected: str) -> bool:
    """Move a relay a peer asked of this KME from ``expected`` to ``state``, with what it passed on; whether it was
    still in ``expected`` (a cancel may have moved it meanwhile)."""
    return driver(target).execute("UPDATE incoming_activations SET state = ?, relay = ? WHERE activation_id = ? "
                                  "AND state = ?", (state, relay, activation_id, expected)).rowcount == 1


def hold_pool_keys(target, ids: list[int], reservation: str) -> None:
    """Reserve pool keys of the peer's direction for a relay passing through this KME."""
    connection = driver(target)
    for chunk, marks in _chunks(ids):
        connection.execute(f"UPDATE pool_keys SET state = {RESERVED}, reservation = ? WHERE id IN ({marks})",
                           (reservation, *chunk))


def add_slaves(target, rows: list[tuple[str, int]]) -> None:
    """Let slave SAEs fetch delivered keys: (key_id, slave_sae_id) rows."""
    if rows:
        insert_rows(driver(target), "INSERT INTO key_slaves (key_id, slave_sae_id, fetched)", "(?, ?, FALSE)", rows)


def lend_pool_keys(target, link_id: int, count: int) -> list[tuple]:
    """Move up to ``count`` free keys of the link to the peer's direction, newest first; (file_id, position) of
    each."""
    connection = driver(target)
    return connection.execute(connection.sql.LEND, (link_id, count)).fetchall()


def any_pool_key(connection) -> bool:
    """Whether the pool holds any key."""
    return connection.execute("SELECT 1 FROM pool_keys LIMIT 1").fetchone() is not None


def all_delivered(connection) -> list[tuple]:
    """(key_id, link_id, master_sae_id, material) of every delivered key (once, when a data key is made)."""
    return connection.execute("SELECT key_id, link_id, master_sae_id, material FROM delivered_keys").fetchall()


def delivered_material(target, key_ids: list[str]) -> list[tuple]:
    """(key_id, link_id, master_sae_id, material) of the delivered keys among ``key_ids``."""
    return [row for chunk, marks in _chunks(key_ids) for row in driver(target).execute(
        f"SELECT key_id, link_id, master_sae_id, material FROM delivered_keys WHERE key_id IN ({marks})", chunk)]


def slaves_of(target, key_ids: list[str]) -> dict[str, list[int]]:
    """The slave SAEs of each delivered key among ``key_ids`` that has any."""
    found: dict[str, list[int]] = {}
    for chunk, marks in _chunks(key_ids):
        for key_id, slave in driver(target).execute(
                f"SELECT key_id, slave_sae_id FROM key_slaves WHERE key_id IN ({marks})", chunk):
            found.setdefault(key_id, []).append(slave)
    return found


def replace_delivered_material(target, rows: list[tuple]) -> None:
    """Store (material, key_id) rows' material."""
    driver(target).executemany("UPDATE delivered_keys SET material = ? WHERE key_id = ?", rows)


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
                              f"WHERE id > ? AND {connection.sql.BYTE_LENGTH}(material) = 32 ORDER BY id LIMIT ?",
                              (after_id, limit)).fetchall()


def count_clear_pool_keys(connection) -> int:
    """How many pool keys are stored in clear (a scan of the pool: for flask encrypt-db's progress only)."""
    return connection.execute(f"SELECT count(*) FROM pool_keys WHERE {connection.sql.BYTE_LENGTH}(material) = 32"
                              ).fetchone()[0]


def replace_pool_material(connection, rows: list[tuple]) -> None:
    """Store (material, id) rows' material."""
    connection.executemany("UPDATE pool_keys SET material = ? WHERE id = ?", rows)


def meta_names(engine) -> set[str]:
    """The names kme_meta holds as committed now (a connection outside the caller's transaction)."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SELECT name FROM kme_meta")
        return {row[0] for row in cursor.fetchall()}
    finally:
        raw.close()
