"""The statements of the key store that run past SQLAlchemy's execution layer (the hot path, ingestion), for
every engine: written once as SQLAlchemy Core, compiled once per dialect (kme.storage.compiled).

They run on a driver connection of a backend (kme.storage.backends), whose
``sql`` attribute holds its dialect and what the engine does its own way
(a named lock, the fingerprint insert). Row locks and skipped locked rows
are part of the statements: SQLite's dialect leaves them out, its write
transactions hold the database's write lock. Only the kme.storage package
and the commands that read totals call these.
"""
from functools import lru_cache

from sqlalchemy import bindparam, delete, func, insert, select, update

from kme.storage.compiled import Statement, many, run, run_many
from kme.storage.models import (
    DeliveredKey,
    Event,
    IncomingActivation,
    KeyFile,
    KeySlave,
    Link,
    Meta,
    OutgoingActivation,
    PoolKey,
    StoredId,
)
from kme.storage.pool_states import OURS, PEERS, RESERVED

# Values per lookup: well under SQLite's limit of 32766 host parameters and PostgreSQL's of 65535.
_LOOKUP_CHUNK = 4096
# Rows of one multi-row INSERT: 5 columns x 500 stays far below either limit of bound parameters.
_ROWS_PER_INSERT = 500

_pool = PoolKey.__table__
_files = KeyFile.__table__
_links = Link.__table__
_delivered = DeliveredKey.__table__
_slaves = KeySlave.__table__
_outgoing = OutgoingActivation.__table__
_incoming = IncomingActivation.__table__


def _free(newest_first: bool = False):
    """The IDs of up to ``count`` free keys of a link, locked and skipping those another transaction holds.

    The index on (link_id, state, id) makes it a range scan of n rows. The
    rows leave the free pool in the statement that selects them, so no other
    transaction can select them too.
    """
    return (select(_pool.c.id).where(_pool.c.link_id == bindparam("link_id"), _pool.c.state == OURS)
            .order_by(_pool.c.id.desc() if newest_first else _pool.c.id).limit(bindparam("count"))
            .with_for_update(skip_locked=True).scalar_subquery())


_TAKE = Statement(delete(_pool).where(_pool.c.id.in_(_free()))
                  .returning(_pool.c.id, _pool.c.file_id, _pool.c.position, _pool.c.material))
_RESERVE = Statement(update(_pool).where(_pool.c.id.in_(_free()))
                     .values(state=RESERVED, reservation=bindparam("reservation"))
                     .returning(_pool.c.id, _pool.c.file_id, _pool.c.position, _pool.c.material))
# Lent keys come from the tail of the pool: the lender keeps its oldest keys.
_LEND = Statement(update(_pool).where(_pool.c.id.in_(_free(newest_first=True))).values(state=PEERS)
                  .returning(_pool.c.file_id, _pool.c.position))
# ``link_id + 0`` keeps SQLite from searching the link's index, which walks every key of the link, instead of
# the reservation's.
_REMOVE_RESERVED = Statement(delete(_pool).where(_pool.c.reservation == bindparam("reservation"),
                                                 _pool.c.link_id + 0 == bindparam("link_id", type_=StoredId()))
                             .returning(_pool.c.file_id, _pool.c.position, _pool.c.material))
_INSERT_POOL = Statement(insert(_pool).values(**{name: bindparam(name) for name in (
    "link_id", "file_id", "position", "state", "material")}), row=("link_id", "file_id", "position", "state",
                                                                   "material"))
_DELIVERED_AND_SLAVES = Statement(
    lambda key_ids: select(_delivered.c.key_id, _delivered.c.link_id, _delivered.c.master_sae_id,
                           _delivered.c.material, _slaves.c.slave_sae_id, _slaves.c.fetched)
    .join(_slaves, _slaves.c.key_id == _delivered.c.key_id).where(_delivered.c.key_id.in_(many("key_ids", key_ids)))
    .with_for_update(), lists=("key_ids",))
_MARK_FETCHED = Statement(
    lambda key_ids: update(_slaves).where(_slaves.c.slave_sae_id == bindparam("slave_sae_id"),
                                          _slaves.c.key_id.in_(many("key_ids", key_ids))).values(fetched=True),
    lists=("key_ids",))
_DELETE_DELIVERED = Statement(
    lambda key_ids: delete(_delivered).where(_delivered.c.key_id.in_(many("key_ids", key_ids)))
    .returning(_delivered.c.key_id, _delivered.c.link_id, _delivered.c.master_sae_id, _delivered.c.material),
    lists=("key_ids",))
_LINK_HISTOGRAM = Statement(select(_links.c.byte_histogram).where(_links.c.peer_kme_id == bindparam("link_id"))
                            .with_for_update())
_SPENT_TOTAL = Statement(select(func.coalesce(func.sum(_links.c.delivered + _links.c.discarded
                                                       + _links.c.set_aside), 0)))
_FILE_NAMES = Statement(lambda ids: select(_files.c.id, _files.c.name).where(_files.c.id.in_(many("ids", ids))),
                        lists=("ids",))
_FILE_IDS = Statement(lambda names: select(_files.c.name, _files.c.id).where(
    _files.c.link_id == bindparam("link_id"), _files.c.name.in_(many("names", names))), lists=("names",))
# One index search on (file_id, position) per position: row values in IN lists are not indexable in SQLite.
_POOL_KEYS_AT = Statement(
    lambda positions: select(_pool.c.id, _pool.c.link_id, _pool.c.state, _pool.c.file_id, _pool.c.position,
                             _pool.c.material)
    .where(_pool.c.file_id == bindparam("file_id"), _pool.c.position.in_(many("positions", positions)))
    .with_for_update(), lists=("positions",))
_DELETE_POOL_KEYS = Statement(lambda ids: delete(_pool).where(_pool.c.id.in_(many("ids", ids))), lists=("ids",))
_ANY_DELIVERED = Statement(lambda key_ids: select(1).where(_delivered.c.key_id.in_(many("key_ids", key_ids)))
                           .limit(1), lists=("key_ids",))
_INSERT_OUTGOING = Statement(insert(_outgoing).values(**{name: bindparam(name) for name in (
    "activation_id", "link_id", "state", "created_at", "request")}))
_TAKE_OUTGOING = Statement(
    lambda states: delete(_outgoing).where(_outgoing.c.activation_id == bindparam("activation_id"),
                                           _outgoing.c.state.in_(many("states", states)))
    .returning(_outgoing.c.link_id, _outgoing.c.request), lists=("states",))
_INCOMING = Statement(select(_incoming.c.link_id, _incoming.c.state, _incoming.c.key_ids)
                      .where(_incoming.c.activation_id == bindparam("activation_id")))
_INSERT_INCOMING = Statement(insert(_incoming).values(**{name: bindparam(name) for name in (
    "activation_id", "link_id", "state", "key_ids", "created_at", "relay")}))
_INCOMING_RELAY = Statement(select(_incoming.c.state, _incoming.c.relay).where(
    _incoming.c.activation_id == bindparam("activation_id"), _incoming.c.relay.is_not(None)))
_SET_INCOMING_RELAY = Statement(update(_incoming).where(_incoming.c.activation_id == bindparam("activation_id"),
                                                        _incoming.c.state == bindparam("expected"))
                                .values(state=bindparam("state"), relay=bindparam("relay")))
_HOLD_POOL_KEYS = Statement(lambda ids: update(_pool).where(_pool.c.id.in_(many("ids", ids)))
                            .values(state=RESERVED, reservation=bindparam("reservation")), lists=("ids",))
_ANY_POOL_KEY = Statement(select(1).select_from(_pool).limit(1))
_ALL_DELIVERED = Statement(select(_delivered.c.key_id, _delivered.c.link_id, _delivered.c.master_sae_id,
                                  _delivered.c.material))
_DELIVERED_MATERIAL = Statement(
    lambda key_ids: select(_delivered.c.key_id, _delivered.c.link_id, _delivered.c.master_sae_id,
                           _delivered.c.material).where(_delivered.c.key_id.in_(many("key_ids", key_ids))),
    lists=("key_ids",))
_SLAVES_OF = Statement(lambda key_ids: select(_slaves.c.key_id, _slaves.c.slave_sae_id).where(
    _slaves.c.key_id.in_(many("key_ids", key_ids))), lists=("key_ids",))
_REPLACE_DELIVERED_MATERIAL = Statement(update(_delivered).where(_delivered.c.key_id == bindparam("key_id"))
                                        .values(material=bindparam("material")), row=("material", "key_id"))
_ALL_HISTOGRAMS = Statement(select(_links.c.peer_kme_id, _links.c.byte_histogram))
_STORE_HISTOGRAM = Statement(update(_links).where(_links.c.peer_kme_id == bindparam("link_id"))
                             .values(byte_histogram=bindparam("histogram")))
# Pool keys stored in clear are 32 bytes; sealed ones are longer.
_CLEAR = func.length(_pool.c.material) == 32
_CLEAR_POOL_KEYS = Statement(select(_pool.c.id, _pool.c.link_id, _pool.c.file_id, _pool.c.position,
                                    _pool.c.material).where(_pool.c.id > bindparam("after_id"), _CLEAR)
                             .order_by(_pool.c.id).limit(bindparam("limit")))
_COUNT_CLEAR_POOL_KEYS = Statement(select(func.count()).select_from(_pool).where(_CLEAR))
_REPLACE_POOL_MATERIAL = Statement(update(_pool).where(_pool.c.id == bindparam("id"))
                                   .values(material=bindparam("material")), row=("material", "id"))
# The database's facts, read by every engine's start-up check too (kme.storage.backends).
READ_META = Statement(select(Meta.__table__.c.name, Meta.__table__.c.value))


def driver(target):
    """The driver connection of ``target``: a Session inside a write transaction, or such a connection itself."""
    if hasattr(target, "sql"):
        return target
    return target.connection().connection.driver_connection


def insert_pool_keys(target, rows) -> None:
    """Add (link_id, file_id, position, state, material) rows (any iterable) in one executemany (ingestion speed)."""
    run_many(driver(target), _INSERT_POOL, rows)


@lru_cache(maxsize=None)
def _inserts(table, columns: tuple[str, ...], constants: tuple[tuple[str, object], ...]) -> Statement:
    """A multi-row INSERT of ``columns`` (the rest of the table's columns set to ``constants``), for any number
    of rows: its list ``values`` holds the rows' values one after the other."""

    def build(values: int):
        # Typed as their columns: SQLAlchemy gives only the first row's parameters their column's type, and an ID
        # column's type turns each ID into the number that stores it (kme.storage.compiled).
        items = iter(many("values", values))
        return insert(table).values([{**dict(constants), **{column: _typed(next(items), table.c[column])
                                                              for column in columns}}
                                     for _row in range(values // len(columns))])

    return Statement(build, lists=("values",))


def _typed(parameter, column):
    return bindparam(parameter.key, type_=column.type)


def _insert_rows(connection, statement: Statement, rows: list[tuple]) -> None:
    """Up to _ROWS_PER_INSERT rows per statement, where executemany steps once a row.

    Every step releases the GIL, and a writer holds its locks while other
    threads run: fewer steps, shorter turns.
    """
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        run(connection, statement, values=[value for row in rows[start:start + _ROWS_PER_INSERT] for value in row])


def insert_delivered(target, keys: list[tuple], slaves: list[tuple]) -> None:
    """Add delivered keys (key_id, link_id, master_sae_id, material, created_at) and their slaves
    (key_id, slave_sae_id), past SQLAlchemy: a request may hand out 128 keys."""
    connection = driver(target)
    _insert_rows(connection, _inserts(_delivered, ("key_id", "link_id", "master_sae_id", "material", "created_at"),
                                      ()), keys)
    add_slaves(connection, slaves)


def _chunks(values: list):
    for start in range(0, len(values), _LOOKUP_CHUNK):
        yield values[start:start + _LOOKUP_CHUNK]


def delivered_keys_and_slaves(connection, key_ids: list[str]) -> list[tuple]:
    """(key_id, link_id, master_sae_id, material, slave_sae_id, fetched) for each slave of each delivered key
    among ``key_ids``: one statement where Get key with key IDs needs both. The rows stay locked until the
    transaction ends (where the engine locks rows), so two concurrent fetches never both find a key unfetched."""
    return [row for chunk in _chunks(key_ids)
            for row in run(connection, _DELIVERED_AND_SLAVES, key_ids=chunk).fetchall()]


def mark_fetched(connection, key_ids: list[str], slave_sae_id: int) -> None:
    """Record that one slave SAE has fetched ``key_ids``."""
    for chunk in _chunks(key_ids):
        run(connection, _MARK_FETCHED, key_ids=chunk, slave_sae_id=slave_sae_id)


def delete_delivered(target, key_ids: list[str]) -> list[tuple]:
    """Delete delivered keys, and so their slave rows (ON DELETE CASCADE, foreign_keys=ON on every connection);
    (key_id, link_id, master_sae_id, material) of each key that was still there."""
    connection = driver(target)
    return [row for chunk in _chunks(key_ids) for row in run(connection, _DELETE_DELIVERED, key_ids=chunk).fetchall()]


def link_histogram(target, link_id: int) -> bytes:
    """The stored byte histogram of a link, its row locked until the transaction ends (it is written back)."""
    return run(driver(target), _LINK_HISTOGRAM, link_id=link_id).fetchone()[0]


@lru_cache(maxsize=None)
def _link_update(names: tuple[str, ...], histogram: bool) -> Statement:
    """Add to the named counters of a link (each named by the code, never by input); store its histogram."""
    values = {name: _links.c[name] + bindparam(name) for name in names}
    if histogram:
        values["byte_histogram"] = bindparam("histogram")
    return Statement(update(_links).where(_links.c.peer_kme_id == bindparam("link_id")).values(values))


def update_link(target, link_id: int, deltas: dict[str, int], histogram: bytes | None) -> None:
    """Add ``deltas`` to a link's counters; store ``histogram`` (unless None)."""
    if deltas or histogram is not None:
        run(driver(target), _link_update(tuple(deltas), histogram is not None), link_id=link_id,
            histogram=histogram, **deltas)


@lru_cache(maxsize=None)
def _link_set(names: tuple[str, ...]) -> Statement:
    return Statement(update(_links).where(_links.c.peer_kme_id == bindparam("link_id")).values(
        {name: bindparam(name) for name in names}))


def set_link(target, link_id: int, **values) -> None:
    """Set columns of a link's row (named by the code): the link row is written only by statements of this
    module, never through the ORM, so that no write of one path undoes one of the other."""
    run(driver(target), _link_set(tuple(values)), link_id=link_id, **values)


def spent_total(connection) -> int:
    """Keys of every link whose fate is final (delivered, discarded, set aside): a sum that only grows."""
    # PostgreSQL sums bigints as numeric (a Decimal).
    return int(run(driver(connection), _SPENT_TOTAL).fetchone()[0])


@lru_cache(maxsize=None)
def _link_columns(columns: tuple[str, ...]) -> Statement:
    return Statement(select(*(_links.c[name] for name in columns)).where(_links.c.peer_kme_id == bindparam("link_id")))


def link_row(target, link_id: int, columns: tuple[str, ...]) -> tuple | None:
    """The named columns (from the code) of one link's row."""
    return run(driver(target), _link_columns(columns), link_id=link_id).fetchone()


def insert_events(target, rows: list[tuple]) -> None:
    """Add (created_at, message) event rows in one statement."""
    _insert_rows(driver(target), _inserts(Event.__table__, ("created_at", "message"), ()), rows)


def add_fingerprints(target, fingerprints) -> set[int]:
    """Store distinct fingerprints (any collection); returns those stored before (whose keys must be refused).

    Sorted, the inserts fill the index's pages one after another.
    """
    ordered = sorted(fingerprints)
    if not ordered:
        return set()
    connection = driver(target)
    return connection.sql.add_fingerprints(connection, ordered, _LOOKUP_CHUNK)


def take_pool_keys(connection, link_id: int, count: int) -> list[tuple]:
    """Remove up to ``count`` free keys of the link's pool, lowest ids first; (file_id, position, material) of
    each in id order."""
    rows = run(connection, _TAKE, link_id=link_id, count=count).fetchall()
    rows.sort()
    return [row[1:] for row in rows]


def reserve_pool_keys(target, link_id: int, count: int, reservation: str) -> list[tuple]:
    """Mark up to ``count`` free keys of the link as reserved for ``reservation``;
    (id, file_id, position, material) of each, in id order."""
    rows = run(driver(target), _RESERVE, link_id=link_id, count=count, reservation=reservation).fetchall()
    rows.sort()
    return rows


def remove_reserved(target, link_id: int, reservation: str) -> list[tuple]:
    """Delete the link's pool keys reserved for ``reservation``; (file_id, position, material) of each."""
    return run(driver(target), _REMOVE_RESERVED, reservation=reservation, link_id=link_id).fetchall()


def file_names(target, file_ids) -> dict[int, str]:
    """The names of key files by ID."""
    connection = driver(target)
    return dict(row for chunk in _chunks(list(file_ids)) for row in run(connection, _FILE_NAMES, ids=chunk))


def file_ids(target, link_id: int, names) -> dict[str, int]:
    """The IDs of the link's key files by name (names not found are left out)."""
    connection = driver(target)
    return dict(row for chunk in _chunks(list(names))
                for row in run(connection, _FILE_IDS, link_id=link_id, names=chunk))


def pool_keys_at(target, positions: dict[int, list[int]]) -> list[tuple]:
    """(id, link_id, state, file_id, position, material) of the pool keys at the given positions of each file,
    locked until the transaction ends (where the engine locks rows), whatever the pool size."""
    connection = driver(target)
    return [row for file_id, wanted in positions.items() for chunk in _chunks(wanted)
            for row in run(connection, _POOL_KEYS_AT, file_id=file_id, positions=chunk).fetchall()]


def delete_pool_keys(target, ids: list[int]) -> None:
    """Delete pool keys by ID."""
    connection = driver(target)
    for chunk in _chunks(ids):
        run(connection, _DELETE_POOL_KEYS, ids=chunk)


def any_delivered(target, key_ids: list[str]) -> bool:
    """Whether a delivered key has one of ``key_ids``."""
    connection = driver(target)
    return any(run(connection, _ANY_DELIVERED, key_ids=chunk).fetchone() for chunk in _chunks(key_ids))


def lock_name(target, name: str) -> None:
    """Hold a lock on ``name`` until the transaction ends, so that transactions about one thing (an activation)
    run one after the other wherever they run (SQLite's write lock already does so)."""
    connection = driver(target)
    connection.sql.lock_name(connection, name)


def insert_outgoing(target, activation_id: str, link_id: int, state: str, created_at: str, request: str) -> None:
    """Record an activation this KME asks of a peer."""
    run(driver(target), _INSERT_OUTGOING, activation_id=activation_id, link_id=link_id, state=state,
        created_at=created_at, request=request)


def take_outgoing(target, activation_id: str, states: tuple[str, ...]) -> tuple | None:
    """Delete an outgoing activation if it is in one of ``states``; its (link_id, request), or None."""
    return run(driver(target), _TAKE_OUTGOING, activation_id=activation_id, states=states).fetchone()


def incoming_activation(target, activation_id: str) -> tuple | None:
    """(link_id, state, key_ids) of an activation a peer asked of this KME, or None."""
    return run(driver(target), _INCOMING, activation_id=activation_id).fetchone()


def insert_incoming(target, activation_id: str, link_id: int, state: str, key_ids: str, created_at: str,
                    relay: str | None = None) -> None:
    """Remember an activation a peer asked of this KME (``relay``: what a relay passed on, as JSON)."""
    run(driver(target), _INSERT_INCOMING, activation_id=activation_id, link_id=link_id, state=state,
        key_ids=key_ids, created_at=created_at, relay=relay)


def incoming_relay(target, activation_id: str) -> tuple | None:
    """(state, relay) of a relay a peer asked of this KME, or None."""
    return run(driver(target), _INCOMING_RELAY, activation_id=activation_id).fetchone()


def set_incoming_relay(target, activation_id: str, state: str, relay: str, expected: str) -> bool:
    """Move a relay a peer asked of this KME from ``expected`` to ``state``, with what it passed on; whether it was
    still in ``expected`` (a cancel may have moved it meanwhile)."""
    return run(driver(target), _SET_INCOMING_RELAY, activation_id=activation_id, state=state, relay=relay,
               expected=expected).rowcount == 1


def hold_pool_keys(target, ids: list[int], reservation: str) -> None:
    """Reserve pool keys of the peer's direction for a relay passing through this KME."""
    connection = driver(target)
    for chunk in _chunks(ids):
        run(connection, _HOLD_POOL_KEYS, ids=chunk, reservation=reservation)


def add_slaves(target, rows: list[tuple[str, int]]) -> None:
    """Let slave SAEs fetch delivered keys: (key_id, slave_sae_id) rows."""
    _insert_rows(driver(target), _inserts(_slaves, ("key_id", "slave_sae_id"), (("fetched", False),)), rows)


def lend_pool_keys(target, link_id: int, count: int) -> list[tuple]:
    """Move up to ``count`` free keys of the link to the peer's direction, newest first; (file_id, position) of
    each."""
    return run(driver(target), _LEND, link_id=link_id, count=count).fetchall()


def any_pool_key(connection) -> bool:
    """Whether the pool holds any key."""
    return run(connection, _ANY_POOL_KEY).fetchone() is not None


def all_delivered(connection) -> list[tuple]:
    """(key_id, link_id, master_sae_id, material) of every delivered key (once, when a data key is made)."""
    return run(connection, _ALL_DELIVERED).fetchall()


def delivered_material(target, key_ids: list[str]) -> list[tuple]:
    """(key_id, link_id, master_sae_id, material) of the delivered keys among ``key_ids``."""
    connection = driver(target)
    return [row for chunk in _chunks(key_ids) for row in run(connection, _DELIVERED_MATERIAL, key_ids=chunk)]


def slaves_of(target, key_ids: list[str]) -> dict[str, list[int]]:
    """The slave SAEs of each delivered key among ``key_ids`` that has any."""
    connection = driver(target)
    found: dict[str, list[int]] = {}
    for chunk in _chunks(key_ids):
        for key_id, slave in run(connection, _SLAVES_OF, key_ids=chunk):
            found.setdefault(key_id, []).append(slave)
    return found


def replace_delivered_material(target, rows: list[tuple]) -> None:
    """Store (material, key_id) rows' material."""
    run_many(driver(target), _REPLACE_DELIVERED_MATERIAL, rows)


def all_histograms(connection) -> list[tuple]:
    """(link_id, byte_histogram) of every link."""
    return run(connection, _ALL_HISTOGRAMS).fetchall()


def store_histogram(connection, link_id: int, histogram: bytes) -> None:
    """Store a link's byte histogram."""
    run(connection, _STORE_HISTOGRAM, link_id=link_id, histogram=histogram)


def clear_pool_keys(connection, after_id: int, limit: int) -> list[tuple]:
    """(id, link_id, file_id, position, material) of up to ``limit`` pool keys stored in clear (32 bytes) with
    IDs above ``after_id``, in ID order: a range scan of the primary key."""
    return run(connection, _CLEAR_POOL_KEYS, after_id=after_id, limit=limit).fetchall()


def count_clear_pool_keys(connection) -> int:
    """How many pool keys are stored in clear (a scan of the pool: for flask encrypt-db's progress only)."""
    return run(connection, _COUNT_CLEAR_POOL_KEYS).fetchone()[0]


def replace_pool_material(connection, rows: list[tuple]) -> None:
    """Store (material, id) rows' material."""
    run_many(connection, _REPLACE_POOL_MATERIAL, rows)


def meta_names(engine) -> set[str]:
    """The names kme_meta holds as committed now (a connection outside the caller's transaction)."""
    raw = engine.raw_connection()
    try:
        return {name for name, _value in run(raw.driver_connection, READ_META).fetchall()}
    finally:
        raw.close()
