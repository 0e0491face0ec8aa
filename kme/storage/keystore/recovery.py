"""A database that went back in time (a restored backup, a standby promoted behind its primary) made safe again.

What the database forgot may have been handed out, by this KME or, across
a link, by its peer: every free key it holds is set aside, the keys waiting
for their slaves are erased, and the key files present are read no further
and offered to no peer (each peer then sets its own free keys of those files
aside, kme.storage.keystore.progress). Reserved keys stay: their
activations are cancelled at the peer and discarded, as always. The
database gets a new ID, so that every peer learns its progress afresh. Only
keys of files that arrive later are used.
"""
import time
import uuid

from sqlalchemy import select, update

from kme import clock
from kme.storage import at_rest, events
from kme.storage.db import write_transaction
from kme.storage.kek import Kek
from kme.storage.keystore.common import KEY_BYTES, erase_delivered
from kme.storage.keystore.progress import FREE, next_seq, set_aside
from kme.storage.models import DeliveredKey, KeyFile, Link, PoolKey


def forget_since_backup(kek: Kek, sizes: dict[int, dict[str, int]]) -> tuple[str, dict[int, tuple[int, int]]]:
    """One transaction: a new database ID; on every link, every free key set aside, the keys waiting for their
    slaves erased, every key file (``sizes``: link -> {name: bytes now}) closed where it stands.

    Returns the new database ID and, per link, (keys set aside, keys erased).
    """
    new_id = uuid.uuid4().hex
    done = {}
    with write_transaction() as session:
        at_rest.rebind(session, kek, new_id.encode())
        for link_id, files in sizes.items():
            done[link_id] = (_set_aside(session, link_id), _erase_waiting(session, link_id))
            _close_files(session, link_id, files)
            session.execute(update(Link).where(Link.peer_kme_id == link_id).values(
                peer_database=None, progress_sent=0, progress_seen=0))
        events.record(session, f"Database restored from a backup made safe: new database ID {new_id}; "
                      f"{sum(aside for aside, _ in done.values())} keys set aside, "
                      f"{sum(erased for _, erased in done.values())} waiting keys erased")
    return new_id, done


def _set_aside(session, link_id: int) -> int:
    erased = set_aside(session, link_id, FREE, PoolKey.link_id == link_id)
    if erased:
        events.record(session, f"Link {link_id}: {erased} keys set aside (the database was restored from a "
                               "backup: they may have been handed out since)")
    return erased


def _erase_waiting(session, link_id: int) -> int:
    key_ids = session.scalars(select(DeliveredKey.key_id).where(DeliveredKey.link_id == link_id)).all()
    return erase_delivered(session, list(key_ids))


def _close_files(session, link_id: int, files: dict[str, int]) -> None:
    """Every file of the link read no further, and offered to the peer no more."""
    known = {row.name: row for row in session.scalars(select(KeyFile).where(KeyFile.link_id == link_id))}
    for name in sorted(known.keys() | files.keys()):
        row = known.get(name)
        if row is None:
            row = KeyFile(link_id=link_id, name=name, next_position=0, length=0, duplicates=0, peer_position=0,
                          decided=0, ingested_at=clock.utc_now())
            session.add(row)
        row.length = max(row.length, files.get(name, 0))
        row.next_position = row.decided = max(row.next_position, row.length // KEY_BYTES)
        row.complete, row.offer_limit = True, 0
        row.changed_at, row.seq = time.time(), next_seq(session, link_id)
        session.flush()
