"""Activations this KME asks of a peer KME: reserve, then finalize, release or discard.

The reservation is committed before the peer is called and settled after, so
no write transaction is held across the network, and a key whose fate is
unknown stays reserved until it is settled: it is never handed out for
another key ID.
"""
import json
from dataclasses import dataclass

from sqlalchemy import select, update

from kme import clock
from kme.errors import PeerFailure
from kme.storage import at_rest, events, statements
from kme.storage.db import db, grouped_write, write_transaction
from kme.storage.keystore import handed_out
from kme.storage.keystore.common import (
    DeliveredKeyMaterial,
    build_keys,
    new_key_id,
    new_key_ids,
    pool_keys_per_key,
    store_delivered,
    update_link,
)
from kme.storage.keystore.local import not_enough_keys
from kme.storage.models import OURS, OutgoingActivation, PoolKey

SENDING = "sending"
UNKNOWN = "unknown"
# The background worker has taken the activation to cancel it at the peer.
CANCELLING = "cancelling"


@dataclass(frozen=True)
class Reservation:
    """Keys reserved for one activation, and the request to send to the peer KME."""

    activation_id: str
    keys: list[DeliveredKeyMaterial]
    request: dict


def reserve(link_id: int, master_sae_id: int, slave_ids: list[int], local_slave_ids: list[int], number: int,
            size_bits: int, key_ids: list[str] | None = None, stream: dict | None = None) -> Reservation:
    """Reserve keys of our direction of the link and record the pending activation (NotEnoughKeys if too few).

    ``key_ids``: the keys' IDs (new random ones if None); ``stream``: the ETSI GS QKD 004 chunk the one key is
    (kme.peers.wire.StreamChunkRefSchema), sent with the activation. Committed with concurrent requests (group
    commit) before this returns.
    """
    activation_id = new_key_id()
    key_ids = key_ids or new_key_ids(number)
    needed = number * pool_keys_per_key(size_bits)
    per_key = pool_keys_per_key(size_bits)

    def work(connection) -> Reservation:
        handed_out.check(connection)
        rows = statements.reserve_pool_keys(connection, link_id, needed, activation_id)
        if len(rows) < needed:
            raise not_enough_keys(number, size_bits, len(rows))
        names = statements.file_names(connection, {file_id for _id, file_id, _position, _material in rows})
        materials = at_rest.open_pool(connection, link_id, [row[1:] for row in rows], names)
        keys = build_keys(key_ids, materials, size_bits)
        request = {
            "activation_ID": activation_id,
            "master_SAE_ID": master_sae_id,
            "slave_SAE_IDs": slave_ids,
            "size": size_bits,
            "keys": [{"key_ID": key.key_id,
                      "parts": [{"file": names[file_id], "position": position}
                                for _id, file_id, position, _material in rows[i * per_key:(i + 1) * per_key]]}
                     for i, key in enumerate(keys)],
            **({"stream": stream} if stream else {}),
        }
        statements.insert_outgoing(connection, activation_id, link_id, SENDING, clock.utc_now(),
                                   json.dumps({"wire": request, "local_slaves": local_slave_ids}))
        update_link(connection, link_id, available=-needed, reserved=needed)
        events.record(connection, f"SAE {master_sae_id} requested a key to communicate with "
                                  f"{' and '.join(map(str, slave_ids + local_slave_ids))}",
                      *(f"As SAE {slave} belongs to KME {link_id}, activating it through inter KMEs network"
                        for slave in slave_ids))
        return Reservation(activation_id, keys, request)

    return grouped_write(work)


def finalize(reservation: Reservation) -> None:
    """The peer activated the keys: they leave the pool; slaves of this KME (multicast) may fetch them here.

    Committed with concurrent requests (group commit) before this returns.
    """

    def work(connection) -> None:
        spent = handed_out.check(connection)
        pending = statements.take_outgoing(connection, reservation.activation_id, (SENDING,))
        if pending is None:
            raise PeerFailure("the peer KME answered after the activation was cancelled; its keys are discarded, "
                              "try again")
        link_id, stored = pending[0], json.loads(pending[1])
        materials = at_rest.open_pool(connection, link_id, statements.remove_reserved(
            connection, link_id, reservation.activation_id))
        wire = stored["wire"]
        local = stored["local_slaves"]
        if local:
            store_delivered(connection, link_id, wire["master_SAE_ID"], local, reservation.keys, clock.utc_now())
        update_link(connection, link_id, removed=materials,
                    added=[key.material for key in reservation.keys] if local else (),
                    reserved=-len(materials), delivered=len(materials))
        slaves = " and ".join(map(str, wire["slave_SAE_IDs"] + local))
        events.record(connection, *(f"Key {key.key_id} activated between SAEs {wire['master_SAE_ID']} and "
                                    f"{slaves}" for key in reservation.keys))
        handed_out.record_once_committed(spent + len(materials))

    grouped_write(work)


def release(activation_id: str) -> None:
    """The peer provably did not activate the keys: they return to the free pool.

    Only while the activation is still SENDING: once the background worker
    cancels it, the peer discards the parts, and so must we.
    """
    with write_transaction() as session:
        pending = statements.take_outgoing(session, activation_id, (SENDING,))
        if pending is None:
            return
        # "link_id + 0": SQLite would otherwise search the link's index, every key of the link, instead of the
        # reservation's (statements.remove_reserved).
        count = session.execute(update(PoolKey).where(PoolKey.reservation == activation_id,
                                                      PoolKey.link_id + 0 == pending[0])
                                .values(state=OURS, reservation=None)).rowcount
        update_link(session, pending[0], reserved=-count, available=count)


def mark_unknown(activation_id: str, why: str) -> None:
    """Keep the keys reserved until the background worker cancels the activation at the peer and discards them.

    For an unknown outcome (the peer may have activated the keys), and for a
    refusal because the peer does not hold them (they must never be claimed
    again). ``why`` completes the event.
    """
    with write_transaction() as session:
        session.execute(update(OutgoingActivation).where(OutgoingActivation.activation_id == activation_id,
                                                         OutgoingActivation.state == SENDING)
                        .values(state=UNKNOWN))
        events.record(session, f"Activation {activation_id} {why}")


def begin_cancel(activation_id: str) -> bool:
    """Take a pending activation for cancelling; False if it was settled meanwhile.

    From here on finalize() refuses it, so the cancel sent next can never
    race a late confirmation into an SAE's answer.
    """
    with write_transaction() as session:
        return session.execute(update(OutgoingActivation).where(
            OutgoingActivation.activation_id == activation_id,
            OutgoingActivation.state.in_((SENDING, UNKNOWN, CANCELLING))).values(state=CANCELLING)).rowcount == 1


def discard(activation_id: str) -> None:
    """Settle an activation whose keys may never be used again (the peer cancelled it)."""
    with write_transaction() as session:
        pending = statements.take_outgoing(session, activation_id, (SENDING, UNKNOWN, CANCELLING))
        if pending is None:
            return
        materials = at_rest.open_pool(session, pending[0],
                                      statements.remove_reserved(session, pending[0], activation_id))
        # A relay hop cancelled after it completed: its keys had left the pool as delivered.
        completed = json.loads(pending[1]).get("completed", 0)
        update_link(session, pending[0], removed=materials, reserved=-len(materials),
                    discarded=len(materials) + completed, delivered=-completed, relayed=-completed)
        events.record(session, f"Activation {activation_id} settled: {len(materials) + completed} keys discarded")


def to_settle(sending_before: str) -> list[tuple[str, int, dict, bool]]:
    """Pending activations nobody waits for: (activation ID, link, wire request, whether it is a relay hop).

    That is every UNKNOWN or CANCELLING one, and every SENDING one older than
    a worker can wait (its worker died between claim and answer, or the peer
    answers slower than any worker waits).
    """
    rows = db.session.scalars(select(OutgoingActivation).where(
        OutgoingActivation.state.in_((UNKNOWN, CANCELLING))
        | ((OutgoingActivation.state == SENDING) & (OutgoingActivation.created_at < sending_before)))).all()
    stored = [(row.activation_id, row.link_id, json.loads(row.request)) for row in rows]
    pending = [(activation_id, link_id, request["wire"], request.get("relay", False))
               for activation_id, link_id, request in stored]
    db.session.commit()
    return pending
