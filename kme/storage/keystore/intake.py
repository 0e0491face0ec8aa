"""Key files into the pools of the links, resumable and idempotent."""
import hashlib
import struct
import time
from dataclasses import dataclass
from itertools import repeat

from sqlalchemy import select

from kme import clock, ids
from kme.errors import IngestionHalted
from kme.key_math import entropy
from kme.storage import at_rest, events, statements
from kme.storage.db import db, meta, write_transaction
from kme.storage.keystore.common import KEY_BYTES, update_link
from kme.storage.keystore.progress import confirm, next_seq
from kme.storage.meta_names import FINGERPRINT_SECRET
from kme.storage.models import OURS, UNCONFIRMED, KeyFile, Link


@dataclass(frozen=True)
class FileProgress:
    """Where ingestion of a key file stands."""

    file_id: int
    next_position: int
    complete: bool
    length: int


def ensure_links(link_ids) -> None:
    """Create the counter row of every configured link that has none yet."""
    with write_transaction() as session:
        known = set(session.scalars(select(Link.peer_kme_id)))
        for link_id in link_ids:
            if ids.number(link_id) not in known:
                session.add(Link(peer_kme_id=link_id, ingested=0, available=0, reserved=0, peer_held=0,
                                 delivered=0, discarded=0, unconfirmed=0, set_aside=0, lent=0, borrowed=0, relayed=0,
                                 progress_sent=0, progress_seen=0, progress_at=0.0, peer_free=0, lease_size=0,
                                 lease_at=0.0, byte_histogram=entropy.EMPTY))


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
            row = KeyFile(link_id=link_id, name=name, next_position=0, complete=False, length=0, duplicates=0,
                          decided=0, seq=0, changed_at=0.0)
            session.add(row)
            session.flush()
        return FileProgress(row.id, row.next_position, row.complete, row.length)


def retire_files(link_id: int, files: list[tuple[str, int]]) -> int:
    """Record key files as ingested without taking any of their keys (an operator's decision); how many.

    A retired file offers no key to the peer, which sets its own copies aside.
    """
    with write_transaction() as session:
        known = {row.name: row for row in session.scalars(select(KeyFile).where(KeyFile.link_id == link_id))}
        # A row with nothing read was only named by the peer so far.
        fresh = [(name, size) for name, size in files
                 if name not in known or (known[name].next_position == 0 and not known[name].complete)]
        for name, size in fresh:
            row = known.get(name) or KeyFile(link_id=link_id, name=name, duplicates=0, peer_position=0, decided=0)
            row.next_position = row.decided = size // KEY_BYTES
            row.complete, row.length, row.offer_limit = True, size, 0
            row.ingested_at, row.changed_at, row.seq = clock.utc_now(), time.time(), next_seq(session, link_id)
            session.add(row)
            session.flush()
            events.record(session, f"Key file {name} on link {link_id} retired by an operator: never ingested")
        return len(fresh)


def fingerprints(materials: list[bytes]) -> list[int]:
    """Keyed 64-bit fingerprints of key material: BLAKE2b in its keyed mode (a MAC) under this database's secret.

    Keyed, so that the fingerprints left after erasure cannot be matched
    against guessed keys without the secret; BLAKE2b's own keyed mode is a
    MAC like HMAC, at a third of HMAC-SHA256's cost per key. 64 bits keep the
    index small; a collision (about 3 % odds over 10^9 keys) would only
    refuse one key, never hand one out twice. Each key's MAC starts from a
    copy of the state that has absorbed the secret, which costs less than
    absorbing it again.
    """
    keyed = hashlib.blake2b(key=at_rest.fingerprint_secret(meta(FINGERPRINT_SECRET)), digest_size=8)
    digests = []
    for material in materials:
        mac = keyed.copy()
        mac.update(material)
        digests.append(mac.digest())
    return list(struct.unpack(f">{len(materials)}q", b"".join(digests)))


def store_keys(this_kme_id: int, link_id: int, progress: FileProgress, materials: list[bytes], length: int,
               complete: bool, max_key_count: int) -> tuple[FileProgress, int]:
    """Add consecutive keys of a file to the link's pool, from ``progress.next_position`` on.

    The file's position advances in the same transaction as the keys, so a
    crash or a second ingestion never adds a key twice; a key whose material
    was ingested before (under any file name, on any link) is refused and its
    position left unused. Keys of a link with another KME wait, unconfirmed,
    until the peer says it holds them too (kme.storage.keystore.progress).
    Returns the new progress and the number refused.
    IngestionHalted if the pool would exceed ``max_key_count``, or if the
    file's position is no longer ``progress`` (another process ingested it).
    """
    with write_transaction() as session:
        row = session.get(KeyFile, progress.file_id)
        if row.next_position != progress.next_position:
            raise IngestionHalted(f"key file {row.name} was ingested by another process meanwhile")
        if row.complete:
            events.record(session, f"Key file {row.name} on link {link_id} grew after it was ingested: "
                                   f"reading on from position {row.next_position}")
        link_row = session.get(Link, link_id)
        if (link_row.available + link_row.reserved + link_row.peer_held + link_row.unconfirmed + len(materials)
                > max_key_count):
            raise IngestionHalted(f"the pool of link {link_id} would exceed max_key_count ({max_key_count})")
        first, file_id = row.next_position, row.id
        prints = fingerprints(materials)
        # The first occurrence of a material in the batch counts; later ones are duplicates. Built backwards,
        # each fingerprint ends up with its lowest position.
        first_at = dict(zip(reversed(prints), range(first + len(prints) - 1, first - 1, -1)))
        known = statements.add_fingerprints(session, first_at)
        if known or len(first_at) < len(prints):
            fresh = sorted(position for fingerprint, position in first_at.items() if fingerprint not in known)
            added = [materials[position - first] for position in fresh]
        else:
            fresh, added = range(first, first + len(materials)), materials
        zone = link_id == this_kme_id
        if added:
            sealed = at_rest.seal_pool(link_id, row.name, fresh, added)
            statements.insert_pool_keys(session, zip(repeat(link_id), repeat(file_id), fresh,
                                                     repeat(OURS if zone else UNCONFIRMED), sealed))
        refused = len(materials) - len(added)
        row.next_position += len(materials)
        row.duplicates += refused
        row.length = length
        row.complete = complete
        update_link(session, link_id, added=added, ingested=len(added),
                    **{"available" if zone else "unconfirmed": len(added)})
        if zone:
            row.decided = row.next_position
        else:
            row.seq, row.changed_at = next_seq(session, link_id), time.time()
            confirm(session, this_kme_id, link_id, row)
        if refused:
            events.record(session, f"Key file {row.name} on link {link_id}: {refused} keys refused, their material "
                                   "was ingested before (a renamed or copied file?)")
        if complete:
            row.ingested_at = clock.utc_now()
            events.record(session, f"Ingested key file {row.name} ({row.next_position - row.duplicates} keys) "
                                   f"on link {link_id}")
        return FileProgress(row.id, row.next_position, row.complete, row.length), refused
