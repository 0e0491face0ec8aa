"""Value types of the key store, counter updates and read-only views."""
import os
import time
from dataclasses import dataclass, fields

from sqlalchemy import delete, func, select

from kme.config import KEY_BITS
from kme.key_math import entropy
from kme.storage import at_rest, statements
from kme.storage.db import db, read_unless_changed, write_transaction
from kme.storage.models import Link, PoolLevel

KEY_BYTES = KEY_BITS // 8
# The debugging page's chart: one sample of each link's pool per minute, for an hour.
LEVEL_SECONDS = 60.0
LEVEL_HISTORY_SECONDS = 3600.0


@dataclass(frozen=True)
class DeliveredKeyMaterial:
    """A key as an SAE receives it."""

    key_id: str
    material: bytes


@dataclass(frozen=True)
class LinkCounts:
    """A link's counters, in 256-bit pool keys."""

    ingested: int
    available: int
    reserved: int
    peer_held: int
    delivered: int
    discarded: int
    unconfirmed: int
    set_aside: int
    lent: int
    borrowed: int
    # The peer's free keys of its own direction when it last said (it lends them on demand).
    peer_free: int


def pool_keys_per_key(size_bits: int) -> int:
    """How many consecutive 256-bit pool keys one key of ``size_bits`` consumes."""
    return -(-size_bits // KEY_BITS)


def new_key_ids(count: int) -> list[str]:
    """``count`` key IDs: UUIDv7 (RFC 9562), 48 bits of Unix time in milliseconds then 74 random bits each.

    Unrelated to any key material. Time-ordered, so that the indexes of keys
    waiting for their slaves grow at one edge: a request for 128 keys then
    writes a few pages, where random IDs would write a page per key. One
    read of the system's random source for all of them.
    """
    stamp = (time.time_ns() // 1_000_000) << 80 | 0x7 << 76 | 0b10 << 62
    randomness = os.urandom(10 * count)
    ids = []
    for start in range(0, 10 * count, 10):
        random = int.from_bytes(randomness[start:start + 10], "big")
        text = f"{stamp | (random >> 62 & 0xFFF) << 64 | random & ((1 << 62) - 1):032x}"
        ids.append(f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}")
    return ids


def new_key_id() -> str:
    """One key ID (see new_key_ids)."""
    return new_key_ids(1)[0]


def build_keys(key_ids: list[str], materials: list[bytes], size_bits: int) -> list[DeliveredKeyMaterial]:
    """Keys of ``size_bits`` from the material of consecutive pool keys; the unused bits of each last one are dropped."""
    per_key = pool_keys_per_key(size_bits)
    return [
        DeliveredKeyMaterial(key_id, b"".join(materials[i * per_key:(i + 1) * per_key])[: size_bits // 8])
        for i, key_id in enumerate(key_ids)
    ]


def update_link(transaction, link_id: int, added=(), removed=(), **deltas: int) -> None:
    """Apply counter deltas and histogram changes (material added to / removed from the link).

    ``transaction``: a Session in a write transaction, or the connection of a
    group commit (kme.storage.db.grouped_write). The statements run past
    SQLAlchemy: this runs for every key handed out. A Link object the caller
    loaded keeps its old counters.
    """
    histogram = None
    if entropy.changed(added, removed):
        stored = at_rest.open_histogram(link_id, statements.link_histogram(transaction, link_id))
        histogram = at_rest.seal_histogram(link_id, entropy.apply(stored, added, removed))
    statements.update_link(transaction, link_id, {name: delta for name, delta in deltas.items() if delta}, histogram)


def store_delivered(transaction, link_id: int, master_sae_id: int, slave_ids: list[int],
                    keys: list[DeliveredKeyMaterial], now: str) -> None:
    """Keep keys for their slave SAEs at this KME (the caller updates the counters)."""
    sealed = at_rest.seal_delivered(link_id, master_sae_id, slave_ids, keys)
    statements.insert_delivered(transaction, [(key.key_id, link_id, master_sae_id, material, now)
                                              for key, material in zip(keys, sealed)],
                                [(key.key_id, slave) for key in keys for slave in slave_ids])


def admit_slaves(transaction, key_ids: list[str], slave_ids: list[int]) -> None:
    """Let ``slave_ids`` fetch delivered keys stored for no slave yet (a held relay, released): their slave rows,
    and each key sealed again for its slaves (keys that expired meanwhile are gone and stay so)."""
    rows = statements.delivered_material(transaction, key_ids)
    statements.add_slaves(transaction, [(key_id, slave) for key_id, *_ in rows for slave in slave_ids])
    resealed = []
    for key_id, link_id, master_sae_id, stored in rows:
        key = DeliveredKeyMaterial(key_id, at_rest.open_delivered(key_id, link_id, master_sae_id, (), stored))
        resealed.append((at_rest.seal_delivered(link_id, master_sae_id, slave_ids, [key])[0], key_id))
    statements.replace_delivered_material(transaction, resealed)


def erase_delivered(transaction, key_ids: list[str], slaves: dict[str, list[int]] | None = None) -> int:
    """Erase delivered keys (and their slave rows) wherever they stand; how many were still there. ``slaves``:
    the slave SAEs of each key, if the caller read them in its transaction."""
    if not key_ids:
        return 0
    if slaves is None:
        slaves = statements.slaves_of(transaction, key_ids)
    erased = statements.delete_delivered(transaction, key_ids)
    by_link: dict[int, list[bytes]] = {}
    for key_id, link_id, master_sae_id, stored in erased:
        by_link.setdefault(link_id, []).append(
            at_rest.open_delivered(key_id, link_id, master_sae_id, slaves.get(key_id, ()), stored))
    for link_id, materials in by_link.items():
        update_link(transaction, link_id, removed=materials)
    return len(erased)


_COUNTERS = tuple(field.name for field in fields(LinkCounts))


def link_counts(link_id: int) -> LinkCounts:
    """The counters of one link (one statement, past SQLAlchemy: every Get status reads them, unless nothing was
    committed since this thread last did, kme.storage.db.read_unless_changed)."""
    return read_unless_changed(("link counts", link_id),
                               lambda connection: LinkCounts(*statements.link_row(connection, link_id, _COUNTERS)))


def sample_levels(link_ids: list[int], now: float) -> None:
    """Record each link's free keys per direction, once per LEVEL_SECONDS; keep the last LEVEL_HISTORY_SECONDS."""
    last = db.session.scalar(select(func.max(PoolLevel.at)))
    db.session.commit()
    if last is not None and now - last < LEVEL_SECONDS:
        return
    with write_transaction() as session:
        for link in session.scalars(select(Link).where(Link.peer_kme_id.in_(link_ids))):
            session.add(PoolLevel(link_id=link.peer_kme_id, at=now, outbound=link.available, inbound=link.peer_free))
        session.execute(delete(PoolLevel).where(PoolLevel.at < now - LEVEL_HISTORY_SECONDS))


def level_history(link_id: int) -> list[tuple[float, int, int]]:
    """The link's recorded levels, oldest first: (epoch seconds, outbound free, inbound free)."""
    rows = db.session.execute(select(PoolLevel.at, PoolLevel.outbound, PoolLevel.inbound).where(
        PoolLevel.link_id == link_id).order_by(PoolLevel.at)).all()
    db.session.commit()
    return [tuple(row) for row in rows]


def link_histograms() -> tuple[bytes, ...]:
    """The byte-value histograms of every link (kme.key_math.entropy merges them), read and opened again only
    once something was committed since this thread last did (kme.storage.db.read_unless_changed)."""
    return read_unless_changed("link histograms", lambda connection: tuple(
        at_rest.open_histogram(link_id, histogram) for link_id, histogram in statements.all_histograms(connection)))
