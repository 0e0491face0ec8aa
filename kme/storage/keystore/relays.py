"""Relays through trusted nodes: the transactions of the KME that starts a relay, of each node and of each
destination (protocol: docs/inter-kme-protocol.md, "Relay").

On each hop a relay is one activation of that hop's link: an outgoing row at
the sender (kme.storage.keystore.outgoing, settled the same way), an
incoming row at the receiver whose ``relay`` column records what it passed
on, so that a cancel or a release follows the key down every hop. Keys in
clear exist only in the memory of the request that relays them.
"""
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update

from kme import clock, ids
from kme.errors import ActivationConflict, NotEnoughKeys, PeerFailure
from kme.key_math import one_time
from kme.storage import at_rest, events, statements
from kme.storage.db import grouped_write, write_transaction
from kme.storage.keystore import outgoing
from kme.storage.keystore.common import (
    DeliveredKeyMaterial,
    admit_slaves,
    erase_delivered,
    store_delivered,
    update_link,
)
from kme.storage.keystore.incoming import ACTIVATED, CANCELLED, peer_states, pool_rows
from kme.storage.models import UNCONFIRMED, IncomingActivation, OutgoingActivation

# Incoming states of a relay beside ACTIVATED (a destination's) and CANCELLED.
RELAYING = "relaying"
RELAYED = "relayed"
FAILED = "failed"
# Outgoing: the relay was decided; its release still has to reach that next hop.
RELEASING = "releasing"


# Parts a relay passing through holds are reserved under an ID of their own, derived from the link and the
# activation ID the neighbour chose: never one of our own activation IDs, which a neighbour could choose.
_HELD = uuid.UUID("2f1c8e4a-6a55-4c1e-9a53-5d1c0b7f3e21")


def held(link_id: int, activation_id: str) -> str:
    """The reservation of the parts held for a relay hop from the neighbour on ``link_id``."""
    return str(uuid.uuid5(_HELD, f"{link_id}/{activation_id}"))


@dataclass(frozen=True)
class Message:
    """A relay as one hop receives it (kme.peers.wire.RelaySchema)."""

    activation_id: str
    relay_id: str
    path: list[int]
    master_sae_id: int
    size_bits: int
    hold: bool
    timeout_seconds: float
    targets: dict[int, list[int]]
    keys: list[tuple[str, list[tuple[str, int]], bytes | None]]
    mac_part: tuple[str, int]

    @property
    def parts(self) -> list[tuple[str, int]]:
        """Every part of the hop's link the message consumes: the keys' (or pads'), then the MAC key."""
        return [part for _, parts, _ in self.keys for part in parts] + [self.mac_part]


@dataclass(frozen=True)
class Branch:
    """Keys of our direction of a next hop's link, reserved for one relay: pads (or the key itself), then the MAC
    key."""

    link_id: int
    activation_id: str
    parts: list[tuple[str, int]]
    materials: list[bytes]

    def cancel_body(self) -> dict:
        """What a cancel or a release of this hop names."""
        return {"activation_ID": self.activation_id,
                "parts": [{"file": name, "position": position} for name, position in self.parts]}


def reserve_branch(link_id: int, activation_id: str, count: int, relay_id: str) -> Branch:
    """Reserve ``count`` keys of our direction of the link for one hop of a relay (NotEnoughKeys if too few)."""

    def work(connection) -> Branch:
        rows = statements.reserve_pool_keys(connection, link_id, count, activation_id)
        if len(rows) < count:
            raise NotEnoughKeys(f"not enough key material on the link with KME {link_id}")
        names = statements.file_names(connection, {file_id for _id, file_id, _position, _material in rows})
        branch = Branch(link_id, activation_id, [(names[file_id], position) for _id, file_id, position, _m in rows],
                        at_rest.open_pool(connection, link_id, [row[1:] for row in rows], names))
        statements.insert_outgoing(connection, activation_id, link_id, outgoing.SENDING, clock.utc_now(),
                                   json.dumps({"wire": branch.cancel_body(), "relay": True}))
        update_link(connection, link_id, available=-count, reserved=count)
        return branch

    return grouped_write(work)


def release_branches(branches: list[Branch]) -> None:
    """Return the keys of hops never sent to the free pool (nothing left this KME)."""
    for branch in branches:
        outgoing.release(branch.activation_id)


@dataclass(frozen=True)
class Received:
    """A relay taken in: its keys (in memory only), or, for a retry of a finished one, how many it activated."""

    keys: list[DeliveredKeyMaterial]
    finished: int | None


def receive(this_kme_id: int, link_id: int, message: Message, authentic: Callable[[bytes], bool],
            local_slaves: list[int], onward: dict[int, str]) -> Received | None:
    """Open a relay from the neighbour on ``link_id``: the last hop stores its keys for our slaves; a trusted node
    holds the parts until its next hops (``onward``: link -> activation ID) answer.

    Refused whole: ActivationConflict if a part is not of the neighbour's direction here, changing nothing. None
    if ``authentic`` (the domain's check of the message under the material of its MAC part) says no: the named
    parts are discarded (a forger has seen a tag under that MAC key: it must never serve again) and the
    activation recorded as cancelled, as if the neighbour had cancelled it before it arrived.
    """
    parts = message.parts

    def work(connection) -> Received | None:
        statements.lock_name(connection, message.activation_id)
        known = statements.incoming_activation(connection, message.activation_id)
        if known is not None:
            known_link, state, key_ids = known
            if known_link != ids.number(link_id) or state not in (ACTIVATED, RELAYED):
                raise ActivationConflict(f"relay activation {message.activation_id} was cancelled, failed, is in "
                                         "progress or belongs to another link")
            return Received([], len(json.loads(key_ids)))
        rows = pool_rows(connection, link_id, parts, peer_states(this_kme_id, link_id))
        if len(rows) != len(parts) or len(set(parts)) != len(parts):
            raise ActivationConflict(f"{len(set(parts)) - len(rows)} of the {len(parts)} keys named are not "
                                     f"available on this KME's link with KME {link_id} (used, set aside, "
                                     "or never held here)")
        if not authentic(rows[message.mac_part].material):
            _discard_unarrived(connection, link_id, message.activation_id, rows,
                               f"Relay activation {message.activation_id} from KME {link_id} fails its one-time MAC")
            return None
        keys = []
        for key_id, key_parts, sealed in message.keys:
            pad = b"".join(rows[part].material for part in key_parts)
            keys.append(DeliveredKeyMaterial(key_id, pad[:message.size_bits // 8] if sealed is None
                                             else one_time.xor(sealed, pad)))
        if local_slaves and statements.any_delivered(connection, [key.key_id for key in keys]):
            raise ActivationConflict("a key ID of this relay is already in use")
        now = clock.utc_now()
        unconfirmed = sum(1 for row in rows.values() if row.state == UNCONFIRMED)
        record = {"relay_ID": message.relay_id, "parts": len(parts), "local_slaves": local_slaves,
                  "held": message.hold, "released": False,
                  "onward": {str(link): {"activation_ID": activation_id} for link, activation_id in onward.items()}}
        row_ids = [row.id for row in rows.values()]
        materials = [row.material for row in rows.values()]
        key_ids = json.dumps([key.key_id for key in keys])
        if onward:
            statements.hold_pool_keys(connection, row_ids, held(link_id, message.activation_id))
            update_link(connection, link_id, peer_held=unconfirmed - len(rows), unconfirmed=-unconfirmed,
                        reserved=len(rows))
            statements.insert_incoming(connection, message.activation_id, link_id, RELAYING, key_ids, now,
                                       json.dumps(record))
            events.record(connection, f"Relay {message.relay_id} from KME {message.path[0]} (activation "
                                      f"{message.activation_id} from KME {link_id}): {len(keys)} keys to pass on to "
                                      f"KME {' and '.join(map(str, sorted(onward, key=ids.order)))}")
            return Received(keys, None)
        statements.delete_pool_keys(connection, row_ids)
        # A held multicast relay lets our slaves fetch only once it is released.
        store_delivered(connection, link_id, message.master_sae_id, [] if message.hold else local_slaves, keys, now)
        update_link(connection, link_id, removed=materials, added=[key.material for key in keys],
                    peer_held=unconfirmed - len(rows), unconfirmed=-unconfirmed, delivered=len(rows),
                    relayed=len(rows))
        statements.insert_incoming(connection, message.activation_id, link_id, ACTIVATED, key_ids, now,
                                   json.dumps(record))
        _record_arrival(connection, message, local_slaves, keys)
        return Received(keys, len(keys))

    return grouped_write(work)


def _discard_unarrived(transaction, link_id: int, activation_id: str, rows: dict, why: str) -> None:
    """Discard the parts of a relay hop that never took effect here, and remember it as cancelled."""
    statements.delete_pool_keys(transaction, [row.id for row in rows.values()])
    unconfirmed = sum(1 for row in rows.values() if row.state == UNCONFIRMED)
    update_link(transaction, link_id, removed=[row.material for row in rows.values()],
                peer_held=unconfirmed - len(rows), unconfirmed=-unconfirmed, discarded=len(rows))
    statements.insert_incoming(transaction, activation_id, link_id, CANCELLED, "[]", clock.utc_now(), "{}")
    events.record(transaction, f"{why}: {len(rows)} keys discarded")


def _record_arrival(connection, message: Message, slaves: list[int], keys: list[DeliveredKeyMaterial]) -> None:
    waiting = " once the relay is released" if message.hold else ""
    events.record(connection, *(f"Key {key.key_id} relayed from KME {message.path[0]} (relay {message.relay_id}) "
                                f"activated between SAEs {message.master_sae_id} and "
                                f"{' and '.join(map(str, slaves))}{waiting}" for key in keys))


@dataclass(frozen=True)
class Node:
    """What this KME does in one relay: the incoming hop (none at the origin), its next hops, its own slaves."""

    relay_id: str
    master_sae_id: int
    # Every slave the relay serves through this KME (for the events).
    slave_ids: list[int]
    incoming: tuple[int, str] | None
    branches: list[Branch]
    local_link: int
    local_slaves: list[int]
    hold: bool


def complete(node: Node, keys: list[DeliveredKeyMaterial], settle: Callable | None = None) -> None:
    """Every next hop confirmed: the parts leave the pools, our slaves get the keys (or, held, will);
    ``settle(connection)``, the caller's own record of it, in the same transaction.

    PeerFailure if the relay was cancelled meanwhile (the upstream gave up): the caller then fails it.
    """

    def work(connection) -> None:
        now = clock.utc_now()
        if node.incoming is not None:
            link_id, activation_id = node.incoming
            cancelled = PeerFailure("the relay was cancelled by the KME before this one while its next hops answered")
            # A cancel of this hop takes the same lock: it waits for this transaction, or this one for it.
            statements.lock_name(connection, activation_id)
            known = statements.incoming_relay(connection, activation_id)
            if known is None or known[0] != RELAYING:
                raise cancelled
            record = json.loads(known[1])
            record["onward"] = {str(branch.link_id): {**branch.cancel_body(), "count": len(branch.parts)}
                                for branch in node.branches}
            if not statements.set_incoming_relay(connection, activation_id, RELAYED, json.dumps(record), RELAYING):
                raise cancelled
            materials = at_rest.open_pool(connection, link_id, statements.remove_reserved(
                connection, link_id, held(link_id, activation_id)))
            update_link(connection, link_id, removed=materials, reserved=-len(materials), delivered=len(materials),
                        relayed=len(materials))
        for branch in node.branches:
            if statements.take_outgoing(connection, branch.activation_id, (outgoing.SENDING,)) is None:
                raise PeerFailure(f"the relay to KME {branch.link_id} was settled while it was sent")
            materials = at_rest.open_pool(connection, branch.link_id, statements.remove_reserved(
                connection, branch.link_id, branch.activation_id))
            update_link(connection, branch.link_id, removed=materials, reserved=-len(materials),
                        delivered=len(materials), relayed=len(materials))
            if node.hold and node.incoming is None:
                statements.insert_outgoing(connection, branch.activation_id, branch.link_id, RELEASING, now,
                                           json.dumps({"wire": branch.cancel_body(), "relay": True}))
        if node.local_slaves:
            store_delivered(connection, node.local_link, node.master_sae_id,
                            [] if node.hold and node.incoming is not None else node.local_slaves, keys, now)
            update_link(connection, node.local_link, added=[key.material for key in keys])
        if settle is not None:
            settle(connection)
        hops = " and ".join(f"KME {branch.link_id}" for branch in node.branches)
        slaves = " and ".join(map(str, node.slave_ids))
        if node.incoming is None:
            events.record(connection, f"SAE {node.master_sae_id} requested a key to communicate with {slaves}",
                          *(f"Key {key.key_id} activated between SAEs {node.master_sae_id} and {slaves} by relay "
                            f"{node.relay_id} through {hops}" for key in keys))
        else:
            events.record(connection, *(f"Key {key.key_id} relayed to {hops} for SAE {slaves} (relay "
                                        f"{node.relay_id})" for key in keys))

    grouped_write(work)


def fail(node: Node, released: list[Branch], to_settle: list[Branch], why: str) -> None:
    """A next hop failed: hops never sent go back to the pool, the others are cancelled by the background worker
    (their pads and MAC keys left this KME: never used again); the incoming parts are discarded."""
    release_branches(released)
    for branch in to_settle:
        outgoing.mark_unknown(branch.activation_id, f"(relay {node.relay_id} to KME {branch.link_id}) failed: "
                                                    "its keys are discarded once KME "
                                                    f"{branch.link_id} cancelled it")
    if node.incoming is None:
        return
    link_id, activation_id = node.incoming
    with write_transaction() as session:
        statements.lock_name(session, activation_id)
        known = statements.incoming_relay(session, activation_id)
        if known is None or known[0] != RELAYING or not statements.set_incoming_relay(
                session, activation_id, FAILED, known[1], RELAYING):
            return
        _discard_held(session, link_id, activation_id)
        events.record(session, f"Relay {node.relay_id} (activation {activation_id} from KME {link_id}) failed: "
                               f"{why}")


def _discard_held(session, link_id: int, activation_id: str) -> int:
    materials = at_rest.open_pool(session, link_id,
                                   statements.remove_reserved(session, link_id, held(link_id, activation_id)))
    update_link(session, link_id, removed=materials, reserved=-len(materials), discarded=len(materials))
    return len(materials)


def cancel(this_kme_id: int, link_id: int, activation_id: str, parts: list[tuple[str, int]]) -> None:
    """Make sure a relay hop from the neighbour on ``link_id`` never takes effect, here and on every hop after.

    Idempotent. A relay that was passed on (or activated) moves all its parts from delivered to discarded and
    erases keys waiting for our slaves; its next hops are cancelled by the background worker.
    """
    with write_transaction() as session:
        statements.lock_name(session, activation_id)
        known = session.get(IncomingActivation, activation_id)
        if known is not None and (known.link_id != ids.number(link_id) or known.relay is None):
            raise ActivationConflict(f"activation {activation_id} is not a relay of KME {link_id}")
        if known is None:
            _discard_unarrived(session, link_id, activation_id,
                               pool_rows(session, link_id, parts, peer_states(this_kme_id, link_id)),
                               f"Relay activation {activation_id} cancelled by KME {link_id} before it arrived")
            return
        if known.state in (CANCELLED, FAILED):
            known.state = CANCELLED
            return
        record = json.loads(known.relay)
        if known.state == RELAYING:
            discarded = _discard_held(session, link_id, activation_id)
            for hop in record["onward"].values():
                session.execute(update(OutgoingActivation).where(
                    OutgoingActivation.activation_id == hop["activation_ID"],
                    OutgoingActivation.state.in_((outgoing.SENDING, outgoing.UNKNOWN)))
                    .values(state=outgoing.CANCELLING))
        else:
            erase_delivered(session, json.loads(known.key_ids))
            discarded = record["parts"]
            update_link(session, link_id, delivered=-discarded, relayed=-discarded, discarded=discarded)
            now = clock.utc_now()
            for link, hop in record["onward"].items():
                statements.insert_outgoing(session, hop["activation_ID"], ids.from_text(link), outgoing.CANCELLING, now,
                                           json.dumps({"wire": {"activation_ID": hop["activation_ID"],
                                                                "parts": hop["parts"]},
                                                       "relay": True, "completed": hop["count"]}))
        known.state = CANCELLED
        events.record(session, f"Relay {record['relay_ID']} (activation {activation_id}) cancelled by KME "
                               f"{link_id}: {discarded} keys of the link discarded"
                               + (", its next hops are cancelled too" if record["onward"] else ""))


def release(link_id: int, activation_id: str) -> list[tuple[str, int, dict]]:
    """A held multicast relay was decided: our slaves may fetch its keys; the releases of its next hops to send
    (activation ID, link, request), recorded until they are confirmed.

    Idempotent; ActivationConflict for a relay that is not passed on or activated here.
    """
    with write_transaction() as session:
        statements.lock_name(session, activation_id)
        known = session.get(IncomingActivation, activation_id)
        if (known is None or known.link_id != ids.number(link_id) or known.relay is None
                or known.state not in (ACTIVATED, RELAYED)):
            raise ActivationConflict(f"activation {activation_id} is no relay of KME {link_id} to release")
        record = json.loads(known.relay)
        if record["released"] or not record["held"]:
            return []
        record["released"] = True
        known.relay = json.dumps(record)
        # Keys that expired meanwhile are gone: their slaves find nothing, as for any expired key.
        admit_slaves(session, json.loads(known.key_ids), record["local_slaves"])
        now = clock.utc_now()
        # The record keys its next hops by their KME IDs as JSON object keys: text.
        pending = [(hop["activation_ID"], ids.from_text(link), {"activation_ID": hop["activation_ID"],
                                                                 "parts": hop["parts"]})
                   for link, hop in record["onward"].items()]
        for hop_id, link, wire in pending:
            statements.insert_outgoing(session, hop_id, link, RELEASING, now, json.dumps({"wire": wire, "relay": True}))
        events.record(session, f"Relay {record['relay_ID']} (activation {activation_id}) released: its keys may be "
                               "fetched" + (", its next hops are released too" if record["onward"] else ""))
        return pending


def releases_pending() -> list[tuple[str, int, dict]]:
    """Releases still to send: (activation ID, link, wire request)."""
    with write_transaction() as session:
        rows = session.scalars(select(OutgoingActivation).where(OutgoingActivation.state == RELEASING)).all()
        return [(row.activation_id, row.link_id, json.loads(row.request)["wire"]) for row in rows]


def released(activation_id: str, refused: str = "") -> None:
    """The next hop confirmed a release, or ``refused`` it (said why, in an event): forget it."""
    with write_transaction() as session:
        if statements.take_outgoing(session, activation_id, (RELEASING,)) is not None and refused:
            events.record(session, f"Release of relay activation {activation_id} {refused}: its slaves there "
                                   "cannot fetch the keys")


def abandon(before: str) -> int:
    """Fail the relays held here since before ``before``, longer than any worker waits (their worker died):
    their parts are discarded, their next hops cancelled by the background worker; how many."""
    with write_transaction() as session:
        rows = session.scalars(select(IncomingActivation).where(IncomingActivation.state == RELAYING,
                                                                IncomingActivation.created_at < before)).all()
        for row in rows:
            row.state = FAILED
            discarded = _discard_held(session, row.link_id, row.activation_id)
            for hop in json.loads(row.relay)["onward"].values():
                session.execute(update(OutgoingActivation).where(
                    OutgoingActivation.activation_id == hop["activation_ID"],
                    OutgoingActivation.state == outgoing.SENDING).values(state=outgoing.UNKNOWN))
            events.record(session, f"Relay activation {row.activation_id} from KME {row.link_id} lost its worker: "
                                   f"{discarded} keys of the link discarded, its next hops are cancelled")
        return len(rows)

