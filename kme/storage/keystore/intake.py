"""Key files into the pools of the links, resumable and idempotent."""
import hashlib
import struct
from dataclasses import dataclass

from sqlalchemy import select

from kme.domain import entropy
from kme.operations import events
from kme.storage import sqlite
from kme.storage.db import FINGERPRINT_SECRET, db, meta, write_transaction
from kme.storage.keystore.common import KEY_BYTES, update_link
from kme.storage.models import OURS, PEERS, KeyFile, Link


@dataclass(frozen=True)
class FileProgress:
    """Where ingestion of a key file stands."""

    file_id: int
    next_position: int
    complete: bool
    length: int


def peer_parity(this_kme_id: int, link_id: int) -> int | None:
    """Parity of the positions that belong to the peer's direction of a link; None inside the zone.

    Both KMEs of a link compute the same split: the KME with the lower ID uses
    even positions, the other odd ones, so the two never pick the same key.
    """
    if link_id == this_kme_id:
        return None
    return 1 if this_kme_id < link_id else 0


def ensure_links(link_ids) -> None:
    """Create the counter row of every configured link that has none yet."""
    with write_transaction() as session:
        known = set(session.scalars(select(Link.peer_kme_id)))
        for link_id in link_ids:
            if link_id not in known:
                session.add(Link(peer_kme_id=link_id, ingested=0, available=0, reserved=0, peer_held=0,
                                 delivered=0, discarded=0, byte_histogram=entropy.EMPTY))


def complete_files(link_id: int) -> dict[str, int]:
    """The link's fully ingested key files: {name: bytes read}."""
    lengths = dict(db.session.execute(select(KeyFile.name, KeyFile.length).where(
        KeyFile.link_id == link_id, KeyFile.complete)).all())
    db.session.commit()
    return lengths


def open_key_file(link_id: int, name: str) -> FileProgress:
    """The ingestion progress of a key file, registering it on first sight."""
    with write_transaction() as session:
        row = session.scalars(select(KeyFile).where(KeyFile.link_id == link_id, KeyFile.name == name)).first()
        if row is None:
            row = KeyFile(link_id=link_id, name=name, next_position=0, complete=False, length=0, duplicates=0)
            session.add(row)
            session.flush()
        return FileProgress(row.id, row.next_position, row.complete, row.length)


def retire_files(link_id: int, files: list[tuple[str, int]]) -> int:
    """Record key files as ingested without taking any of their keys (an operator's decision); how many."""
    with write_transaction() as session:
        known = set(session.scalars(select(KeyFile.name).where(KeyFile.link_id == link_id)))
        fresh = [(name, size) for name, size in files if name not in known]
        for name, size in fresh:
            session.add(KeyFile(link_id=link_id, name=name, next_position=size // KEY_BYTES, complete=True,
                                length=size, duplicates=0, ingested_at=events.utc_now()))
            events.record(session, f"Key file {name} on link {link_id} retired by an operator: never ingested")
        return len(fresh)


def fingerprints(materials: list[bytes]) -> list[int]:
    """Keyed 64-bit fingerprints of key material: BLAKE2b in its keyed mode (a MAC) under this database's secret.

    Keyed, so that the fingerprints left after erasure cannot be matched
    against guessed keys without the secret; BLAKE2b's own keyed mode is a
    MAC like HMAC, at a third of HMAC-SHA256's cost per key. 64 bits keep the
    index small; a collision (about 3 % odds over 10^9 keys) would only
    refuse one key, never hand one out twice.
    """
    secret = meta(FINGERPRINT_SECRET)
    digests = b"".join([hashlib.blake2b(material, key=secret, digest_size=8).digest() for material in materials])
    return list(struct.unpack(f">{len(materials)}q", digests))


def store_keys(link_id: int, progress: FileProgress, materials: list[bytes], length: int, complete: bool,
               max_key_count: int, parity_of_peer: int | None) -> tuple[FileProgress, int]:
    """Add consecutive keys of a file to the link's pool, from ``progress.next_position`` on.

    The file's position advances in the same transaction as the keys, so a
    crash or a second ingestion never adds a key twice; a key whose material
    was ingested before (under any file name, on any link) is refused and its
    position left unused. Returns the new progress and the number refused.
    Raises ValueError if the pool would exceed ``max_key_count``.
    """
    with write_transaction() as session:
        row = session.get(KeyFile, progress.file_id)
        if row.next_position != progress.next_position:
            raise RuntimeError(f"key file {row.name} was ingested concurrently")
        if row.complete:
            events.record(session, f"Key file {row.name} on link {link_id} grew after it was ingested: "
                                   f"reading on from position {row.next_position}")
        link_row = session.get(Link, link_id)
        if link_row.available + link_row.reserved + link_row.peer_held + len(materials) > max_key_count:
            raise ValueError(f"the pool of link {link_id} would exceed max_key_count ({max_key_count})")
        # The first occurrence of a material in the batch counts; later ones are duplicates.
        first_at: dict[int, int] = {}
        for position, fingerprint in enumerate(fingerprints(materials), start=row.next_position):
            first_at.setdefault(fingerprint, position)
        known = sqlite.add_fingerprints(session.connection(), list(first_at))
        # first_at keeps the order of first occurrence: position order.
        fresh = [position for fingerprint, position in first_at.items() if fingerprint not in known]
        first, file_id = row.next_position, row.id
        added = [materials[position - first] for position in fresh]
        rows = [(link_id, file_id, position, PEERS if position % 2 == parity_of_peer else OURS, material)
                for position, material in zip(fresh, added)]
        if rows:
            sqlite.insert_pool_keys(session.connection(), rows)
        peers = sum(1 for item in rows if item[3] == PEERS)
        refused = len(materials) - len(rows)
        row.next_position += len(materials)
        row.duplicates += refused
        row.length = length
        row.complete = complete
        update_link(session, link_id, added=added, ingested=len(rows), available=len(rows) - peers,
                    peer_held=peers)
        if refused:
            events.record(session, f"Key file {row.name} on link {link_id}: {refused} keys refused, their material "
                                   "was ingested before (a renamed or copied file?)")
        if complete:
            row.ingested_at = events.utc_now()
            events.record(session, f"Ingested key file {row.name} ({row.next_position - row.duplicates} keys) "
                                   f"on link {link_id}")
        return FileProgress(row.id, row.next_position, row.complete, row.length), refused
