"""Key activation between KMEs, both sides, as plain functions of explicit arguments.

Master side: reserve keys of our direction of the link (borrowing from the
peer's direction first if ours has too few, see kme.domain.sharing), ask the
peer KME to activate them, then finalize (confirmed), release (provably not
activated) or hold them back (outcome unknown, or refused as not held by the
peer) until settle_pending() cancels them at the peer. Slave side: check that
the calling KME acts only on its own link, for its own master SAE and our
slave SAEs, then activate. For a slave behind a foreign KMS of this KME
(the gateway), an activation or a relay ending here is answered only once
that KMS took the keys (kme.domain.interop).
"""
import logging
import time
from functools import partial

from kme import clock
from kme.config import KmeConfig, OtherKme, Sae
from kme.domain import interop, relay, sharing
from kme.errors import (
    ActivationConflict,
    BadRequest,
    Forbidden,
    ForeignKmsFailure,
    PeerError,
    PeerFailure,
    PeerOutcomeUnknown,
    PeerRefused,
    RelayFailure,
)
from kme.operations import metrics
from kme.peers.client import client_for
from kme.storage.keystore import incoming, outgoing
from kme.storage.keystore.common import DeliveredKeyMaterial, pool_keys_per_key
from kme.storage.keystore.incoming import ActivationRequest
from kme.storage.keystore.relays import Message

log = logging.getLogger(__name__)

# A web worker waits at most connect + read timeout of the longest peer for
# all the peer calls of one request (kme.domain.relay.peer_wait); a SENDING
# activation older than this margin times that has lost its worker.
_SENDING_MARGIN = 2


def activate_at_peer(config: KmeConfig, peer: OtherKme, master: Sae, remote_slaves: list[Sae],
                     local_slaves: list[Sae], number: int, size_bits: int, key_ids: list[str] | None = None,
                     stream: dict | None = None) -> list[DeliveredKeyMaterial]:
    """Get key for slave SAEs behind ``peer``: answered only once the peer confirmed the activation; leases and
    the activation together wait no longer than the peer's connect and read timeouts. ``key_ids`` and ``stream``:
    as outgoing.reserve takes them (an ETSI GS QKD 004 chunk)."""
    deadline = time.monotonic() + relay.peer_wait([peer])
    reserve = partial(outgoing.reserve, peer.id, master.id, [s.id for s in remote_slaves],
                      [s.id for s in local_slaves], number, size_bits, key_ids, stream)
    reservation = sharing.reserve_borrowing(peer, reserve, number * pool_keys_per_key(size_bits), deadline)
    try:
        client_for(peer).activate(reservation.request, deadline)
    except PeerOutcomeUnknown as exc:
        metrics.PEER_FAILURES.labels(str(peer.id), "unknown").inc()
        outgoing.mark_unknown(reservation.activation_id, "has an unknown outcome; its keys are held back")
        log.warning("activation %s: %s", reservation.activation_id, exc)
        raise PeerFailure(f"{exc}; the keys are held back until KME {peer.id} settles them") from None
    except PeerRefused as exc:
        metrics.PEER_FAILURES.labels(str(peer.id), "refused").inc()
        log.warning("activation %s: %s: %s", reservation.activation_id, exc, exc.detail)
        if keys_held_back(exc):
            # The peer does not hold (all) these keys: never retry them, cancel them at both ends.
            outgoing.mark_unknown(reservation.activation_id, f"refused by KME {peer.id} as not held there; "
                                                             "its keys are set aside")
        else:
            outgoing.release(reservation.activation_id)
        raise
    except PeerError as exc:
        metrics.PEER_FAILURES.labels(str(peer.id), "unreachable").inc()
        outgoing.release(reservation.activation_id)
        log.warning("activation %s: %s", reservation.activation_id, exc)
        raise
    outgoing.finalize(reservation)
    return reservation.keys


def keys_held_back(failure: PeerFailure) -> bool:
    """Whether the keys of an activate_at_peer that raised ``failure`` are held back until settle_pending cancels
    them at both ends (an unknown outcome, or refused as not held by the peer), never used again; otherwise they
    went back to the pool."""
    return not isinstance(failure, PeerError) or (isinstance(failure, PeerRefused) and failure.status == 409)


def accept_activation(config: KmeConfig, caller: OtherKme, request: ActivationRequest) -> int:
    """Activate keys a peer KME asks for, after checking it acts within its rights; for a slave behind a foreign
    KMS of this KME, answered once that KMS has them (kme.domain.interop)."""
    foreign_slave = _check_sides(config, caller, request)
    refusal = config.this_kme.limits.refusal(request.size_bits, len(request.keys), "activation")
    if refusal:
        raise BadRequest(refusal)
    relay.check_parts(request.size_bits, [parts for _, parts in request.keys])
    activated = incoming.activate(config.this_kme.id, caller.id, request)
    if foreign_slave:
        try:
            interop.hand_over_activated(config, request.master_sae_id, request.slave_ids[0],
                                        [key_id for key_id, _parts in request.keys])
        except ForeignKmsFailure as failure:
            raise ActivationConflict(str(failure)) from None
    return activated


def cancel_activation(config: KmeConfig, caller: OtherKme, request: ActivationRequest) -> None:
    """Make sure an activation of ``caller`` never takes effect here."""
    _check_sides(config, caller, request)
    incoming.cancel(config.this_kme.id, caller.id, request)


def _check_sides(config: KmeConfig, caller: OtherKme, request: ActivationRequest) -> bool:
    """Forbidden unless the master is the caller's and the slaves ours; whether the slave is behind a foreign KMS
    of this KME (then the only slave)."""
    master = config.saes_by_id.get(request.master_sae_id)
    if master is None or master.kme_id != caller.id:
        raise Forbidden(f"SAE {request.master_sae_id} is not an SAE of KME {caller.id}")
    foreign = relay.foreign_slave(config, request.slave_ids, "activation")
    for slave_id in request.slave_ids:
        slave = config.saes_by_id.get(slave_id)
        if foreign is None and (slave is None or slave.kme_id != config.this_kme.id):
            raise Forbidden(f"SAE {slave_id} is not an SAE of this KME")
    return foreign is not None


def accept_relay(config: KmeConfig, caller: OtherKme, message: Message, body: bytes, mac: bytes) -> int:
    """Take a relay from the neighbour ``caller`` (kme.domain.relay.accept); one whose only slave is an SAE behind a
    foreign KMS of this KME is answered once that KMS acknowledged its keys (kme.domain.interop), with a
    RelayFailure otherwise (the hop before then cancels it here: the keys are never used)."""
    started = time.monotonic()
    count = relay.accept(config, caller, message, body, mac)
    slave = relay.foreign_slave(config, message.targets.get(config.this_kme.id, []), "relay")
    if slave is not None:
        # The hop before waits no longer than the message's timeout; the foreign KMS gets what is left of our share.
        left = message.timeout_seconds * relay.ONWARD_SHARE - (time.monotonic() - started)
        try:
            interop.hand_over_activated(config, message.master_sae_id, slave.id,
                                        [key_id for key_id, _parts, _sealed in message.keys], left)
        except ForeignKmsFailure as failure:
            log.warning("relay %s: %s", message.relay_id, failure)
            raise RelayFailure(config.this_kme.id, slave.kme_id, "foreign") from None
    return count


def abandoned_before(config: KmeConfig) -> str:
    """Requests to peers sent before this time have lost the worker that waited for them."""
    return clock.utc_now(relay.peer_wait(config.other_kmes) * _SENDING_MARGIN)


def settle_pending(config: KmeConfig) -> int:
    """Cancel at their peers the activations nobody waits for, then discard their keys; how many settled."""
    settled = 0
    for activation_id, link_id, request, is_relay in outgoing.to_settle(abandoned_before(config)):
        peer = config.other_kmes_by_id.get(config.kme_id(link_id))
        if peer is None:
            # The link left the configuration: its keys can never be used again.
            outgoing.discard(activation_id)
            continue
        # Compare-and-set before the cancel leaves: a web worker whose peer
        # answers late then finds the row cancelling and never answers its SAE.
        if not outgoing.begin_cancel(activation_id):
            continue
        client = client_for(peer)
        try:
            (client.cancel_relay if is_relay else client.cancel)(request)
        except PeerError as exc:
            log.info("activation %s not settled yet: %s", activation_id, exc)
            continue
        outgoing.discard(activation_id)
        settled += 1
    return settled
