"""Key files into the pools of the links, resumable and idempotent."""
from dataclasses import dataclass

from sqlalchemy import select

from kme import entropy, events, sqlite
from kme.db import db, write_transaction
from kme.keystore.common import update_link
from kme.models import OURS, PEERS, KeyFile, Link


@dataclass(frozen=True)
class FileProgress:
    """Where ingestion of a key file stands."""

    file_id: int
    next_position: int
    complete: bool


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


def complete_files(link_id: int) -> set[str]:
    """Names of the link's key files that are fully ingested."""
    names = set(db.session.scalars(select(KeyFile.name).where(KeyFile.link_id == link_id, KeyFile.complete)))
    db.session.commit()
    return names


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
               max_key_count: int, parity_of_peer: int | None) -> FileProgress:
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
        if link_row.available + link_row.reserved + link_row.peer_held + len(materials) > max_key_count:
            raise ValueError(f"the pool of link {link_id} would exceed max_key_count ({max_key_count})")
        rows = [(link_id, row.id, position, PEERS if position % 2 == parity_of_peer else OURS, material)
                for position, material in enumerate(materials, start=row.next_position)]
        if rows:
            sqlite.insert_pool_keys(session.connection(), rows)
        peers = sum(1 for item in rows if item[3] == PEERS)
        row.next_position += len(materials)
        row.complete = complete
        update_link(session, link_id, added=materials, ingested=len(rows), available=len(rows) - peers,
                    peer_held=peers)
        if complete:
            row.ingested_at = events.utc_now()
            events.record(session, f"Ingested key file {row.name} ({row.next_position} keys) on link {link_id}")
        return FileProgress(row.id, row.next_position, row.complete)
