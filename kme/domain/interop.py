"""ETSI GS QKD 020 (draft 0.4.1): keys that another vendor's KMS in our trusted node passes us, their voids and
the acknowledgements we owe it; keys we pass it for the SAEs behind it (docs/interop.md).

Receiving: a container's keys are stored at once, sealed, for its target
SAEs of this KME, or passed on by our own relay (a one-time pad on every
hop) to the KMEs of the others; the ``relayed`` acknowledgement is queued
only once every target holds them, ``failed`` with the reason otherwise,
and the background worker sends it with retries. An SAE fetches such a key
by ETSI GS QKD 014 Get key with key IDs, naming the initiator SAE as master.

Sending: keys for a slave SAE behind a foreign KMS (taken from this KME's
zone for a master here, or activated here by a linked KME for its master)
are passed to the foreign KMS with ext_keys, and the master gets them only
once it acknowledged them ``relayed``: anything else, or nothing within its
read timeout, fails the request.
"""
import base64
import json
import logging
import time
from urllib.parse import urlsplit

from kme.config import ForeignKms, KmeConfig, Sae
from kme.domain import relay
from kme.errors import BadRequest, ForeignKmsFailure, RelayFailure
from kme.ids import Id
from kme.operations import metrics
from kme.peers.foreign import foreign_client
from kme.storage.keystore import interop as store
from kme.storage.keystore import local as keystore_local
from kme.storage.keystore.common import DeliveredKeyMaterial
from kme.storage.keystore.interop import Container

log = logging.getLogger(__name__)

# How often a request that passed keys to a foreign KMS looks for its acknowledgement.
ACK_POLL_SECONDS = 0.02

# The longest wait between two attempts to deliver an acknowledgement.
ACK_BACKOFF_MAX_SECONDS = 300.0
ROUTING_ERROR = "key routing error"


def receive(config: KmeConfig, foreign: ForeignKms, keys: list[DeliveredKeyMaterial], initiator_id: Id,
            target_ids: list[Id], ack_url: str, extension_mandatory: dict | None = None) -> None:
    """ext_keys: take the keys in for their targets (see the module); BadRequest, with nothing stored, when the
    container cannot be served as it is."""
    if extension_mandatory:
        raise BadRequest("not all extension_mandatory parameters are supported",
                         [{"extension_mandatory_unsupported": f"{name} is not supported"}
                          for name in extension_mandatory])
    initiator, targets = _parties(config, foreign, initiator_id, target_ids)
    _check_keys(config, keys)
    _check_callback(foreign, ack_url)
    container = Container(foreign.id, initiator.id, tuple(target.id for target in targets),
                          tuple(key.key_id for key in keys), ack_url)
    this = config.this_kme.id
    local = [target.id for target in targets if target.kme_id == this]
    remote: dict[Id, list[Id]] = {}
    for target in targets:
        if target.kme_id != this:
            remote.setdefault(target.kme_id, []).append(target.id)
    if not store.claim(container, keys, None if remote else local):
        return
    if remote:
        try:
            relay.forward(config, initiator, remote, local, keys, foreign.id,
                          lambda connection: store.relayed(connection, container, keys, local))
        except RelayFailure as failure:
            if store.fail(container, str(failure)):
                _count("received", "failed", len(keys) * len(targets))
            return
    _count("received", "relayed", len(keys) * len(targets))


def void(config: KmeConfig, foreign: ForeignKms, key_ids: list[str] | None, initiator_id: Id, target_ids: list[Id],
         ack_url: str, all_confirmation: bool) -> None:
    """ext_keys/void: discard keys this foreign KMS passed us before their target SAEs fetched them; without
    ``key_ids``, every such key of the pair of SAEs, if ``all_confirmation`` says so."""
    initiator, targets = _parties(config, foreign, initiator_id, target_ids)
    _check_callback(foreign, ack_url)
    if not key_ids and not all_confirmation:
        raise BadRequest("no_key_ids_or_confirmation", [{"no_key_ids_or_confirmation": (
            "When no key_ids are passed, all keys shared between the SAEs will be voided. If this is the intended "
            "action, the `all_confirmation` field must also be set to true.")}])
    if key_ids and len(set(key_ids)) != len(key_ids):
        raise BadRequest("void request not understood", [{"key_voiding_error": "a key_id is named twice"}])
    outcomes = store.void(Container(foreign.id, initiator.id, tuple(target.id for target in targets),
                                    tuple(key_ids or ()), ack_url), not key_ids)
    for outcome in outcomes:
        _count("received", outcome.status, len(outcome.key_ids))


def send(config: KmeConfig, master: Sae, slave: Sae, number: int, size_bits: int) -> list[DeliveredKeyMaterial]:
    """Get key for ``master`` (an SAE of this KME) and ``slave`` (behind a foreign KMS): keys of this KME's zone,
    answered once the foreign KMS acknowledged them ``relayed``; ForeignKmsFailure otherwise (the keys are
    spent: they may have reached the foreign KMS)."""
    foreign = config.foreign_kms_by_id[slave.kme_id]
    keys = keystore_local.deliver_local(
        config.this_kme.id, master.id, [], number, size_bits,
        hand_over=lambda connection, keys: store.expect(connection, foreign.id, master.id, slave.id,
                                                        [key.key_id for key in keys]))
    _hand_over(foreign, master.id, slave.id, keys, foreign.read_timeout_seconds)
    return keys


def hand_over_activated(config: KmeConfig, master_id: Id, slave_id: Id, key_ids: list[str],
                        within: float | None = None) -> None:
    """Keys a KME of ours activated or relayed here for its master and ``slave_id``, an SAE behind a foreign KMS:
    passed to it (waiting no longer than its read timeout, nor than ``within`` seconds), erased here once it
    acknowledged them ``relayed``; ForeignKmsFailure otherwise (the master's KME then cancels them here, and
    they are never used). A retry never passes a key again: one passed before must have been acknowledged."""
    foreign = config.foreign_kms_by_id[config.saes_by_id[slave_id].kme_id]
    keys = store.prepare_hand_over(foreign.id, master_id, slave_id, key_ids)
    passed_before = set(key_ids) - {key.key_id for key in keys}
    if passed_before:
        _check_passed(foreign, sorted(passed_before))
    if keys:
        _hand_over(foreign, master_id, slave_id, keys, foreign.read_timeout_seconds if within is None
                   else min(within, foreign.read_timeout_seconds))
    store.handed_over(key_ids)


def _hand_over(foreign: ForeignKms, master_id: Id, slave_id: Id, keys: list[DeliveredKeyMaterial],
               wait: float) -> None:
    """Pass keys recorded as being sent to the foreign KMS and wait, no longer than ``wait`` seconds in all, for
    its acknowledgement; ForeignKmsFailure unless it says ``relayed``."""
    deadline = time.monotonic() + wait
    key_ids = [key.key_id for key in keys]
    container = {"keys": [{"key_id": key.key_id, "value": base64.b64encode(key.material).decode("ascii")}
                          for key in keys],
                 "initiator_sae_id": str(master_id), "target_sae_ids": [str(slave_id)],
                 "ack_callback_url": foreign.ack_callback_url}
    try:
        if wait <= 0:
            raise ForeignKmsFailure(f"foreign KMS {foreign.id}: no time was left to pass the keys")
        foreign_client(foreign).pass_keys(json.dumps(container), wait)
        _check_passed(foreign, key_ids, deadline, wait)
    except ForeignKmsFailure:
        store.give_up(key_ids, "not acknowledged")
        _count("sent", "failed", len(keys))
        raise
    _count("sent", "relayed", len(keys))


def _check_passed(foreign: ForeignKms, key_ids: list[str], deadline: float | None = None, wait: float = 0) -> None:
    """Wait until ``deadline`` (none: look once), ``wait`` seconds after the keys left, for the foreign KMS's
    acknowledgement of every key; ForeignKmsFailure unless it says ``relayed``."""
    while True:
        outcome = store.sent_outcome(key_ids)
        pending = [key_id for key_id in key_ids if outcome.get(key_id, (store.SENDING, ""))[0] == store.SENDING]
        failed = [outcome[key_id][1] for key_id in key_ids if outcome.get(key_id, ("", ""))[0] == store.FAILED]
        if failed:
            raise ForeignKmsFailure(f"foreign KMS {foreign.id} did not deliver the keys: {failed[0]}")
        if not pending:
            return
        if deadline is None:
            raise ForeignKmsFailure(f"foreign KMS {foreign.id} has not acknowledged the keys passed before")
        if time.monotonic() >= deadline:
            raise ForeignKmsFailure(f"foreign KMS {foreign.id} acknowledged no key within {wait:.3g} s")
        time.sleep(ACK_POLL_SECONDS)


def acknowledged(foreign: ForeignKms, containers: list[dict]) -> None:
    """ext_keys/ack: what became of keys we passed the calling foreign KMS; BadRequest (key not present), recording
    nothing, if it names a key we did not pass it."""
    outcomes = []
    for container in containers:
        status, message = container["ack_status"], container.get("message", "")
        outcomes.append(([item["key_id"] for item in container["key_ids"]],
                         store.RELAYED if status == "relayed" else store.FAILED,
                         f"{status}: {message}" if message else status))
    if store.acknowledged(foreign.id, outcomes):
        raise BadRequest("key not present", [{"key_not_present": "The acknowledged key ID(s) are not known to this "
                                                                  "KME."}])


def _parties(config: KmeConfig, foreign: ForeignKms, initiator_id: Id, target_ids: list[Id]) -> tuple[Sae, list[Sae]]:
    """The initiator (an SAE behind this foreign KMS) and the targets (SAEs of our network this foreign KMS may
    deliver to, each reached by a route); BadRequest with the draft's details otherwise."""
    initiator = config.saes_by_id.get(initiator_id)
    if initiator is None or initiator.kme_id != foreign.id:
        raise BadRequest(ROUTING_ERROR, [{"initiator_sae_id_not_recognized": f"SAE {initiator_id} is not an SAE "
                                                                             f"behind foreign KMS {foreign.id}"}])
    if len(set(target_ids)) != len(target_ids):
        raise BadRequest("target_sae_ids: an SAE is named twice")
    if len(target_ids) > config.this_kme.limits.max_SAE_ID_count + 1:
        raise BadRequest(f"target_sae_ids: at most {config.this_kme.limits.max_SAE_ID_count + 1} "
                         "(max_SAE_ID_count of this KME, plus one)")
    targets = []
    for target_id in target_ids:
        target = config.saes_by_id.get(target_id)
        if target is None:
            raise BadRequest(ROUTING_ERROR, [{"target_sae_id_not_recognized": f"SAE {target_id} is not known to "
                                                                              "this KME"}])
        if target.kme_id in config.foreign_kms_by_id:
            raise BadRequest(ROUTING_ERROR, [{"invalid_routing": f"SAE {target_id} is behind a foreign KMS: keys "
                                                                 "are not passed back"}])
        if target_id not in foreign.target_sae_ids:
            raise BadRequest(ROUTING_ERROR, [{"invalid_routing": f"foreign KMS {foreign.id} may not deliver keys to "
                                                                 f"SAE {target_id} (target_sae_ids of its entry)"}])
        if target.kme_id != config.this_kme.id and config.next_hop(target.kme_id) is None:
            raise BadRequest(ROUTING_ERROR, [{"no_known_route": f"no route to KME {target.kme_id} of SAE "
                                                                f"{target_id}"}])
        targets.append(target)
    return initiator, targets


def _check_keys(config: KmeConfig, keys: list[DeliveredKeyMaterial]) -> None:
    limits = config.this_kme.limits
    if len(keys) > limits.max_key_per_request:
        raise BadRequest(f"keys: at most {limits.max_key_per_request} per container (max_key_per_request)")
    if len({key.key_id for key in keys}) != len(keys):
        raise BadRequest("keys: a key_id is named twice", [{"duplicate_key_id": "a key_id is named twice"}])
    sizes = {len(key.material) * 8 for key in keys}
    if len(sizes) != 1:
        raise BadRequest("keys: every key of one container has one length")
    size = sizes.pop()
    if not limits.min_key_size <= size <= limits.max_key_size:
        raise BadRequest(f"keys: a key of {size} bits; this KME serves keys of {limits.min_key_size} to "
                         f"{limits.max_key_size} bits")


def _check_callback(foreign: ForeignKms, url: str) -> None:
    """Acknowledgements go over HTTPS to the host of the foreign KMS, never elsewhere: the KME calls it with a
    client certificate, and a URL of the request's choosing must not make it call anyone else."""
    host = urlsplit(foreign.base_url).hostname
    if _https_host(url) != host:
        raise BadRequest(f"ack_callback_url: an https:// URL on the host of foreign KMS {foreign.id} ({host}) is "
                         "required")


def _https_host(url: str) -> str | None:
    """The host of an https:// URL whose port is valid, else None."""
    try:
        parts = urlsplit(url)
        valid_port = parts.port is None or parts.port > 0
    except ValueError:
        return None
    return parts.hostname if parts.scheme == "https" and valid_port else None


def send_acks(config: KmeConfig) -> None:
    """Deliver the acknowledgements that are due (the background worker, every housekeeping interval): retried
    with a growing wait, kept as failed after the foreign KMS's ``ack_attempts``."""
    for ack in store.due_acks():
        foreign = config.foreign_kms_by_id.get(config.kme_id(ack.foreign_kms_id))
        if foreign is None:
            store.ack_failed(ack, ack.foreign_kms_id, "the foreign KMS left the configuration")
            continue
        try:
            foreign_client(foreign).acknowledge(ack.url, ack.body)
        except ForeignKmsFailure as failure:
            if ack.attempts + 1 >= foreign.ack_attempts:
                log.warning("acknowledgement %s to foreign KMS %s failed for good: %s", ack.ack_id, foreign.id,
                            failure)
                store.ack_failed(ack, foreign.id, str(failure))
            else:
                wait = min(config.this_kme.housekeeping_interval_seconds * 2 ** ack.attempts, ACK_BACKOFF_MAX_SECONDS)
                store.ack_retry(ack, str(failure), time.time() + wait)
            continue
        store.ack_sent(ack)


def fail_abandoned(config: KmeConfig, before: str) -> None:
    """Keys whose relay started before ``before`` and never ended (its worker died): failed, and acknowledged
    so."""
    groups: dict[tuple, tuple[set, set]] = {}
    for key_id, target, foreign, initiator, url in store.relaying_before(before):
        key_ids, targets = groups.setdefault((foreign, initiator, url), (set(), set()))
        key_ids.add(key_id)
        targets.add(target)
    for (foreign, initiator, url), (key_ids, targets) in groups.items():
        container = Container(config.kme_id(foreign), config.sae_id(initiator),
                              tuple(config.sae_id(target) for target in sorted(targets)), tuple(sorted(key_ids)), url)
        if store.fail(container, "the relay was abandoned (the KME's worker stopped while it ran)"):
            _count("received", "failed", len(key_ids) * len(targets))


def _count(direction: str, status: str, keys: int) -> None:
    if keys:
        metrics.child(metrics.INTEROP_KEYS, direction, status).inc(keys)

