"""The one module that writes key rows: pool intake, claims, delivery and erasure.

Every function here is one write transaction: it either happens entirely or
not at all, and it keeps the link counters exact
(ingested = available + delivered + discarded, in 256-bit pool keys).
"""
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, insert, select

from kme import entropy, events, sqlite
from kme.config import KEY_BITS
from kme.db import db, write_transaction
from kme.errors import KEYS_NOT_FOUND, bad_request, unauthorized, unavailable
from kme.models import DeliveredKey, KeyFile, Link, PoolKey

KEY_BYTES = KEY_BITS // 8


@dataclass(frozen=True)
class DeliveredKeyMaterial:
    """A key as an SAE receives it."""

    key_id: str
    material: bytes


@dataclass(frozen=True)
class LinkCounts:
    """A link's counters: ingested = available + delivered + discarded."""

    ingested: int
    available: int
    delivered: int
    discarded: int


@dataclass(frozen=True)
class FileProgress:
    """Where ingestion of a key file stands."""

    file_id: int
    next_position: int
    complete: bool


def pool_keys_per_key(size_bits: int) -> int:
    """How many consecutive 256-bit pool keys one key of ``size_bits`` consumes."""
    return -(-size_bits // KEY_BITS)


def ensure_links(link_ids) -> None:
    """Create the counter row of every configured link that has none yet."""
    with write_transaction() as session:
        known = set(session.scalars(select(Link.peer_kme_id)))
        for link_id in link_ids:
            if link_id not in known:
                session.add(Link(peer_kme_id=link_id, ingested=0, available=0, delivered=0,
                                 discarded=0, byte_histogram=entropy.EMPTY))


def link_counts(link_id: int) -> LinkCounts:
    """The counters of one link, in 256-bit pool keys."""
    row = db.session.get(Link, link_id)
    counts = LinkCounts(row.ingested, row.available, row.delivered, row.discarded)
    db.session.commit()
    return counts


def total_byte_counts() -> list[int]:
    """Byte-value histogram of all key material the KME holds, over every link."""
    counts = entropy.merge(db.session.scalars(select(Link.byte_histogram)))
    db.session.commit()
    return counts


def open_key_file(link_id: int, name: str) -> FileProgress:
    """The ingestion progress of a key file, registering it on first sight."""
    with write_transaction() as session:
        row = session.scalars(select(KeyFile).where(KeyFile.link_id == link_id, KeyFile.name == name)).first()
        if row is None:
            row = KeyFile(link_id=link_id, name=name, next_position=0, complete=False)
            session.add(row)
            session.flush()
        return FileProgress(row.id, row.next_position, row.complete)


def store_keys(link_id: int, progress: FileProgress, materials: list[bytes], complete: bool,
               max_key_count: int) -> FileProgress:
    """Add consecutive keys of a file to the link's pool, from ``progress.next_position`` on.

    The file's position advances in the same transaction as the keys, so a
    crash or a second ingestion never adds a key twice. Raises ValueError if
    the pool would exceed ``max_key_count``.
    """
    with write_transaction() as session:
        row = session.get(KeyFile, progress.file_id)
        if row.next_position != progress.next_position:
            raise RuntimeError(f"key file {row.name} was ingested concurrently")
        link_row = session.get(Link, link_id)
        if link_row.available + len(materials) > max_key_count:
            raise ValueError(f"the pool of link {link_id} would exceed max_key_count ({max_key_count})")
        if materials:
            session.execute(insert(PoolKey), [
                {"link_id": link_id, "file_id": row.id, "position": row.next_position + offset, "material": material}
                for offset, material in enumerate(materials)
            ])
        row.next_position += len(materials)
        row.complete = complete
        if complete:
            row.ingested_at = events.utc_now()
        link_row.ingested += len(materials)
        link_row.available += len(materials)
        link_row.byte_histogram = entropy.adjust(link_row.byte_histogram, entropy.byte_counts(materials), 1)
        if complete:
            events.record(session, f"Ingested key file {row.name} ({row.next_position} keys) on link {link_id}")
        return FileProgress(row.id, row.next_position, row.complete)


def deliver_local(link_id: int, master_sae_id: int, slave_sae_id: int, number: int,
                  size_bits: int) -> list[DeliveredKeyMaterial]:
    """Take ``number`` keys of ``size_bits`` from the link's pool for a master/slave pair.

    All or nothing: without enough pool keys nothing is taken (503). Each key
    is built from consecutive pool keys; the unused bits of the last one are
    discarded with it, never reused. The keys wait for the slave SAE in
    delivered_keys under fresh random UUIDs.
    """
    per_key = pool_keys_per_key(size_bits)
    with write_transaction() as session:
        claimed = sqlite.claim_pool_keys(session.connection(), link_id, number * per_key)
        if len(claimed) < number * per_key:
            raise unavailable(
                f"not enough key material: {number} keys of {size_bits} bits need {number * per_key} "
                f"keys of {KEY_BITS} bits, {len(claimed)} available"
            )
        now = events.utc_now()
        keys = [
            DeliveredKeyMaterial(
                key_id=str(uuid.uuid4()),
                material=b"".join(row.material for row in claimed[i * per_key:(i + 1) * per_key])[: size_bits // 8],
            )
            for i in range(number)
        ]
        session.execute(insert(DeliveredKey), [
            {"key_id": key.key_id, "link_id": link_id, "master_sae_id": master_sae_id,
             "slave_sae_id": slave_sae_id, "material": key.material, "created_at": now}
            for key in keys
        ])
        link_row = session.get(Link, link_id)
        link_row.available -= len(claimed)
        link_row.delivered += len(claimed)
        histogram = entropy.adjust(link_row.byte_histogram, entropy.byte_counts(row.material for row in claimed), -1)
        link_row.byte_histogram = entropy.adjust(histogram, entropy.byte_counts(key.material for key in keys), 1)
        for key in keys:
            events.record(session, f"Key {key.key_id} activated between SAEs {master_sae_id} and {slave_sae_id}")
        return keys


def fetch_delivered(master_sae_id: int, slave_sae_id: int, key_ids: list[str]) -> list[DeliveredKeyMaterial]:
    """Hand delivered keys to their slave SAE and erase them from the KME.

    401 if any requested key was made for another slave SAE; 400 with the
    standard's message if any is unknown, already fetched, or from another
    master. Nothing is erased unless every key is handed out.
    """
    with write_transaction() as session:
        rows = {row.key_id: row for row in session.scalars(select(DeliveredKey).where(DeliveredKey.key_id.in_(key_ids)))}
        if any(row.slave_sae_id != slave_sae_id for row in rows.values()):
            raise unauthorized("SAE %d is not the slave SAE of one or more requested keys" % slave_sae_id)
        if len(rows) != len(key_ids) or any(row.master_sae_id != master_sae_id for row in rows.values()):
            raise bad_request(KEYS_NOT_FOUND)
        session.execute(delete(DeliveredKey).where(DeliveredKey.key_id.in_(key_ids)))
        by_link: dict[int, list[bytes]] = {}
        for row in rows.values():
            by_link.setdefault(row.link_id, []).append(row.material)
        for link_id, materials in by_link.items():
            link_row = session.get(Link, link_id)
            link_row.byte_histogram = entropy.adjust(link_row.byte_histogram, entropy.byte_counts(materials), -1)
        for key_id in key_ids:
            events.record(session, f"SAE {slave_sae_id} requested key {key_id} (from {master_sae_id})")
        return [DeliveredKeyMaterial(key_id, rows[key_id].material) for key_id in key_ids]
