"""Keys for SAEs of this KME: delivery inside the zone, fetch by key ID, expiry."""
from collections.abc import Callable

from sqlalchemy import select

from kme import clock, ids
from kme.config import KEY_BITS
from kme.errors import NotEnoughKeys
from kme.storage import at_rest, events, statements
from kme.storage.db import grouped_write, write_transaction
from kme.storage.keystore import handed_out
from kme.storage.keystore.common import (
    DeliveredKeyMaterial,
    build_keys,
    erase_delivered,
    new_key_ids,
    pool_keys_per_key,
    store_delivered,
    update_link,
)
from kme.storage.models import DeliveredKey


def not_enough_keys(number: int, size_bits: int, available: int):
    """The error when the pool cannot serve a whole request."""
    return NotEnoughKeys(f"not enough key material: {number} keys of {size_bits} bits need "
                         f"{number * pool_keys_per_key(size_bits)} keys of {KEY_BITS} bits, {available} available")


def deliver_local(link_id: int, master_sae_id: int, slave_ids: list[int], number: int,
                  size_bits: int, hand_over: Callable | None = None) -> list[DeliveredKeyMaterial]:
    """Take ``number`` keys of ``size_bits`` from the zone's pool for a master SAE and its slaves here, or, with
    ``hand_over``, for a slave behind a foreign KMS: the keys are not kept, ``hand_over(connection, keys)``
    records where they go in the same transaction.

    All or nothing: without enough pool keys nothing is taken (NotEnoughKeys). Each key
    is built from consecutive pool keys; the unused bits of the last one are
    discarded with it, never reused. The keys wait for their slave SAEs under
    fresh random key IDs. Committed with concurrent requests (group commit)
    before this returns.
    """
    needed = number * pool_keys_per_key(size_bits)
    key_ids = new_key_ids(number)
    slaves = " and ".join(map(str, slave_ids))

    def deliver(connection) -> list[DeliveredKeyMaterial]:
        spent = handed_out.check(connection)
        taken = at_rest.open_pool(connection, link_id, statements.take_pool_keys(connection, link_id, needed))
        if len(taken) < needed:
            raise not_enough_keys(number, size_bits, len(taken))
        keys = build_keys(key_ids, taken, size_bits)
        if hand_over is None:
            store_delivered(connection, link_id, master_sae_id, slave_ids, keys, clock.utc_now())
        else:
            hand_over(connection, keys)
        update_link(connection, link_id, removed=taken, added=[] if hand_over else [key.material for key in keys],
                    available=-needed, delivered=needed)
        events.record(connection, f"SAE {master_sae_id} requested a key to communicate with {slaves}",
                      *(f"Key {key.key_id} activated between SAEs {master_sae_id} and {slaves}" for key in keys))
        handed_out.record_once_committed(spent + needed)
        return keys

    return grouped_write(deliver)


def fetch_delivered(master_sae_id: int, slave_sae_id: int, key_ids: list[str],
                    check: Callable[[dict[str, tuple[bool, bool | None]]], None]) -> list[DeliveredKeyMaterial]:
    """Hand delivered keys to one of their slave SAEs; a key is erased once all its slaves have it.

    ``check`` (the domain's rule) sees, for each requested key that exists,
    whether ``master_sae_id`` made it and whether this slave fetched it
    already (None: it is not one of its slaves), and raises to refuse; nothing changes unless
    every key is handed out. Committed with concurrent requests (group
    commit) before this returns.
    """

    # The rows hold IDs as the database stores them.
    master_number, slave_number = ids.number(master_sae_id), ids.number(slave_sae_id)

    def fetch(connection) -> list[DeliveredKeyMaterial]:
        # A database gone back in time may hold keys that their slaves fetched since.
        handed_out.check(connection)
        keys, slaves, mine, waiting = {}, {}, {}, set()
        rows = statements.delivered_keys_and_slaves(connection, key_ids)
        for key_id, link_id, master, material, slave, fetched in rows:
            keys[key_id] = (link_id, master, material)
            slaves.setdefault(key_id, []).append(slave)
            if slave == slave_number:
                mine[key_id] = fetched
            elif not fetched:
                waiting.add(key_id)
        check({key_id: (master == master_number, mine.get(key_id))
               for key_id, (_link, master, _material) in keys.items()})
        # Keys that other slaves still wait for are marked fetched by this one; the others are erased.
        kept = [key_id for key_id in key_ids if key_id in waiting]
        if kept:
            statements.mark_fetched(connection, kept, slave_sae_id)
        erase_delivered(connection, [key_id for key_id in key_ids if key_id not in waiting], slaves)
        events.record(connection, *(f"SAE {slave_sae_id} requested key {key_id} (from {master_sae_id})"
                                    for key_id in key_ids))
        # Opened for the slaves the key's rows name: a slave added outside the KME makes it refuse to open.
        return [DeliveredKeyMaterial(key_id, at_rest.open_delivered(key_id, keys[key_id][0], keys[key_id][1],
                                                                    slaves[key_id], keys[key_id][2]))
                for key_id in key_ids]

    return grouped_write(fetch)


def expire_delivered(created_before: str, limit: int = 1000) -> int:
    """Erase up to ``limit`` delivered keys created before the given time that a slave never fetched."""
    with write_transaction() as session:
        key_ids = session.scalars(select(DeliveredKey.key_id).where(DeliveredKey.created_at < created_before)
                                  .order_by(DeliveredKey.created_at).limit(limit)).all()
        erase_delivered(session, key_ids)
        if key_ids:
            events.record(session, *(f"Key {key_id} expired before its slave SAEs fetched it, erased"
                                     for key_id in key_ids))
        return len(key_ids)
