"""Value types of the key store, counter updates and read-only views."""
import os
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update

from kme.config import KEY_BITS
from kme.domain import entropy
from kme.storage import sqlite
from kme.storage.db import db, write_transaction
from kme.storage.models import DeliveredKey, KeySlave, Link, PoolLevel

KEY_BYTES = KEY_BITS // 8
# The tables the hot path writes with Core statements.
_LINKS, _DELIVERED, _SLAVES = Link.__table__, DeliveredKey.__table__, KeySlave.__table__
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


def new_key_id() -> str:
    """A key ID: a UUIDv7 (RFC 9562), 48 bits of Unix time in milliseconds then 74 random bits.

    Unrelated to any key material. Time-ordered, so that the indexes of keys
    waiting for their slaves grow at one edge: a request for 128 keys then
    writes a few pages, where random IDs would write a page per key.
    """
    random = int.from_bytes(os.urandom(10), "big")
    value = ((time.time_ns() // 1_000_000) << 80 | 0x7 << 76 | (random >> 62 & 0xFFF) << 64 | 0b10 << 62
             | random & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def build_keys(key_ids: list[str], rows: list, size_bits: int) -> list[DeliveredKeyMaterial]:
    """Keys of ``size_bits`` from consecutive pool rows; the unused bits of each last row are dropped."""
    per_key = pool_keys_per_key(size_bits)
    return [
        DeliveredKeyMaterial(key_id, b"".join(row.material for row in rows[i * per_key:(i + 1) * per_key])[
            : size_bits // 8])
        for i, key_id in enumerate(key_ids)
    ]


def update_link(session, link_id: int, added=(), removed=(), **deltas: int) -> None:
    """Apply counter deltas and histogram changes (material added to / removed from the link).

    Core statements on the table, past the ORM: this runs for every key
    handed out. A Link object the caller loaded keeps its old counters.
    """
    connection = session.connection()
    values = {name: _LINKS.c[name] + delta for name, delta in deltas.items() if delta}
    if entropy.changed(added, removed):
        histogram = connection.scalar(select(_LINKS.c.byte_histogram).where(_LINKS.c.peer_kme_id == link_id))
        values["byte_histogram"] = entropy.apply(histogram, added, removed)
    if values:
        connection.execute(update(_LINKS).where(_LINKS.c.peer_kme_id == link_id).values(values))


def store_delivered(session, link_id: int, master_sae_id: int, slave_ids: list[int],
                    keys: list[DeliveredKeyMaterial], now: str) -> None:
    """Keep keys for their slave SAEs at this KME (the caller updates the counters)."""
    sqlite.insert_delivered(session.connection(),
                            [(key.key_id, link_id, master_sae_id, key.material, now) for key in keys],
                            [(key.key_id, slave) for key in keys for slave in slave_ids])


def erase_delivered(session, key_ids: list[str]) -> int:
    """Erase delivered keys (and their slave rows) wherever they stand; how many were still there."""
    if not key_ids:
        return 0
    connection = session.connection()
    connection.execute(delete(_SLAVES).where(_SLAVES.c.key_id.in_(key_ids)))
    erased = connection.execute(delete(_DELIVERED).where(_DELIVERED.c.key_id.in_(key_ids))
                                .returning(_DELIVERED.c.link_id, _DELIVERED.c.material)).all()
    by_link: dict[int, list[bytes]] = {}
    for row in erased:
        by_link.setdefault(row.link_id, []).append(row.material)
    for link_id, materials in by_link.items():
        update_link(session, link_id, removed=materials)
    return len(erased)


def link_counts(link_id: int) -> LinkCounts:
    """The counters of one link."""
    row = db.session.get(Link, link_id)
    counts = LinkCounts(row.ingested, row.available, row.reserved, row.peer_held, row.delivered, row.discarded,
                        row.unconfirmed, row.set_aside, row.lent, row.borrowed, row.peer_free)
    db.session.commit()
    return counts


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


def total_byte_counts() -> list[int]:
    """Byte-value histogram of all key material the KME holds, over every link."""
    counts = entropy.merge(db.session.scalars(select(Link.byte_histogram)))
    db.session.commit()
    return counts
