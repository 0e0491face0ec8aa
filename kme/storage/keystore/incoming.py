"""Activations a peer KME asks of this KME, idempotent by activation ID.

The peer names keys by (file name, position) on its link with us; only keys
of the peer's direction of the link can be activated: PEERS here, or, when
the peer is the link's arbiter, keys we have not confirmed yet (the arbiter
confirmed them first; they can only ever be its own or lent to us by it).
"""
import json
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import delete, select

from kme import clock, ids
from kme.errors import ActivationConflict
from kme.storage import at_rest, events, statements
from kme.storage.db import grouped_write, write_transaction
from kme.storage.keystore import handed_out
from kme.storage.keystore.common import (
    DeliveredKeyMaterial,
    erase_delivered,
    pool_keys_per_key,
    store_delivered,
    update_link,
)
from kme.storage.keystore.progress import is_arbiter
from kme.storage.models import PEERS, UNCONFIRMED, DeliveredKey, IncomingActivation, KeySlave

ACTIVATED = "activated"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class ActivationRequest:
    """What a peer KME asks: keys named by their parts, for its master SAE and our slave SAEs."""

    activation_id: str
    master_sae_id: int
    slave_ids: list[int]
    size_bits: int
    keys: list[tuple[str, list[tuple[str, int]]]]
    # The ETSI GS QKD 004 chunk that the one key is (kme.peers.wire.StreamChunkRefSchema), or None.
    stream: dict | None = None


def activate(this_kme_id: int, link_id: int, request: ActivationRequest) -> int:
    """Activate the keys for our slave SAEs; the number of keys. Refused whole (ActivationConflict) if any part is
    missing.

    Committed with concurrent requests (group commit) before this returns.
    """
    wanted = [part for _, parts in request.keys for part in parts]
    states = peer_states(this_kme_id, link_id)

    def work(connection) -> int:
        # A retry of this activation, or its cancel, arriving at another front end waits for this one.
        statements.lock_name(connection, request.activation_id)
        spent = handed_out.check(connection)
        known = statements.incoming_activation(connection, request.activation_id)
        if known is not None:
            known_link, state, key_ids = known
            if known_link != ids.number(link_id) or state != ACTIVATED:
                raise ActivationConflict(f"activation {request.activation_id} was cancelled or belongs to another link")
            return len(json.loads(key_ids))
        rows = pool_rows(connection, link_id, wanted, states)
        if len(rows) != len(wanted) or len(set(wanted)) != len(wanted):
            raise ActivationConflict(f"{len(set(wanted)) - len(rows)} of the {len(wanted)} keys named are not "
                                     f"available on this KME's link with KME {link_id} (used, set aside, "
                                     "or never held here)")
        if statements.any_delivered(connection, [key_id for key_id, _ in request.keys]):
            raise ActivationConflict("a key ID of this activation is already in use")
        statements.delete_pool_keys(connection, [row.id for row in rows.values()])
        keys = [
            DeliveredKeyMaterial(key_id, b"".join(rows[part].material for part in parts)[: request.size_bits // 8])
            for key_id, parts in request.keys
        ]
        now = clock.utc_now()
        store_delivered(connection, link_id, request.master_sae_id, request.slave_ids, keys, now)
        unconfirmed = sum(1 for row in rows.values() if row.state == UNCONFIRMED)
        update_link(connection, link_id, removed=[row.material for row in rows.values()],
                    added=[key.material for key in keys], peer_held=unconfirmed - len(rows),
                    unconfirmed=-unconfirmed, delivered=len(rows))
        statements.insert_incoming(connection, request.activation_id, link_id, ACTIVATED,
                                   json.dumps([key.key_id for key in keys]), now)
        slaves = " and ".join(map(str, request.slave_ids))
        events.record(connection, *(f"Key {key.key_id} activated between SAEs {request.master_sae_id} and "
                                    f"{slaves}" for key in keys))
        handed_out.record_once_committed(spent + len(rows))
        return len(keys)

    return grouped_write(work)


def cancel(this_kme_id: int, link_id: int, request: ActivationRequest) -> None:
    """Make sure an activation never takes effect: erase its keys, or its parts if it never arrived."""
    with write_transaction() as session:
        statements.lock_name(session, request.activation_id)
        known = session.get(IncomingActivation, request.activation_id)
        if known is not None and (known.link_id != ids.number(link_id) or known.relay is not None):
            raise ActivationConflict(f"activation {request.activation_id} belongs to another link, or is a relay "
                                     "(cancelled as such)")
        if known is not None and known.state == CANCELLED:
            return
        if known is not None:
            key_ids = json.loads(known.key_ids)
            # Keys that no slave fetched were never delivered to anyone: they
            # count as discarded, as the master KME counts them.
            unused = set(session.scalars(select(DeliveredKey.key_id).where(DeliveredKey.key_id.in_(key_ids)))) \
                - set(session.scalars(select(KeySlave.key_id).where(KeySlave.key_id.in_(key_ids), KeySlave.fetched)))
            erased = erase_delivered(session, key_ids)
            moved = len(unused) * pool_keys_per_key(request.size_bits)
            update_link(session, link_id, delivered=-moved, discarded=moved)
            known.state = CANCELLED
            events.record(session, f"Activation {request.activation_id} cancelled by KME {link_id}: "
                                   f"{erased} unfetched keys erased")
            return
        rows = pool_rows(session, link_id, [part for _, parts in request.keys for part in parts],
                          peer_states(this_kme_id, link_id))
        statements.delete_pool_keys(session, [row.id for row in rows.values()])
        unconfirmed = sum(1 for row in rows.values() if row.state == UNCONFIRMED)
        update_link(session, link_id, removed=[row.material for row in rows.values()],
                    peer_held=unconfirmed - len(rows), unconfirmed=-unconfirmed, discarded=len(rows))
        session.add(IncomingActivation(activation_id=request.activation_id, link_id=link_id, state=CANCELLED,
                                       key_ids="[]", created_at=clock.utc_now()))
        events.record(session, f"Activation {request.activation_id} cancelled by KME {link_id} before it arrived: "
                               f"{len(rows)} keys discarded")


def forget_before(created_before: str) -> None:
    """Drop the memory of old activations (kept only as long as a peer may retry or cancel)."""
    with write_transaction() as session:
        session.execute(delete(IncomingActivation).where(IncomingActivation.created_at < created_before))


def peer_states(this_kme_id: int, link_id: int) -> tuple[int, ...]:
    return (PEERS,) if is_arbiter(this_kme_id, link_id) else (PEERS, UNCONFIRMED)


class _PoolRow(NamedTuple):
    id: int
    link_id: int
    state: int
    file_id: int
    position: int
    material: bytes


def pool_rows(transaction, link_id: int, parts: list[tuple[str, int]], states: tuple[int, ...]) -> dict:
    """The pool rows in ``states`` at the given (file name, position) parts, keyed by part.

    One index search per part on (file_id, position), whatever the pool
    size: the link and the state are checked on the rows found, since a
    condition on them would steer SQLite to the (link_id, state) index and
    a scan of every key of the link.
    """
    files = statements.file_ids(transaction, link_id, {name for name, _ in parts})
    positions: dict[int, list[int]] = {}
    for name, position in parts:
        if name in files:
            positions.setdefault(files[name], []).append(position)
    if not positions:
        return {}
    by_file = {file_id: name for name, file_id in files.items()}
    stored_link = ids.number(link_id)
    rows = [row for row in map(_PoolRow._make, statements.pool_keys_at(transaction, positions))
            if row.link_id == stored_link and row.state in states]
    materials = at_rest.open_pool(transaction, link_id, [(row.file_id, row.position, row.material)
                                                           for row in rows], by_file)
    return {(by_file[row.file_id], row.position): row._replace(material=material)
            for row, material in zip(rows, materials)}
