"""Keys that foreign KMSs pass us (ETSI GS QKD 020) and the acknowledgements we owe them (docs/interop.md).

The keys of a container are claimed by key ID and target SAE in the
transaction that stores them (or, when some go on by relay, before the
relay starts): a replay finds them and is answered from what was recorded,
never delivered again. Each acknowledgement waits in an outbox in the same
transaction as the outcome it reports, so none is lost; the background
worker sends it (kme.domain.interop). Neither table holds key material:
a key waiting for its SAE is a delivered key, sealed like every other.
"""
import json
import time
from dataclasses import dataclass

from kme import clock, ids
from kme.errors import BadRequest
from kme.ids import Id
from kme.storage import at_rest, events
from kme.storage import interop_statements as rows
from kme.storage import statements
from kme.storage.db import read_connection, write_transaction
from kme.storage.keystore.common import (
    DeliveredKeyMaterial,
    erase_delivered,
    pool_keys_per_key,
    store_delivered,
    update_link,
)

# A key's fate for one target SAE.
HELD = "held"
RELAYING = "relaying"
RELAYED = "relayed"
FAILED = "failed"
VOIDED = "voided"
# A key passed to a foreign KMS, not acknowledged yet.
SENDING = "sending"
# The draft's acknowledgement statuses besides relayed, voided and failed.
NOT_PRESENT = "key not present"
# An acknowledgement in the outbox.
ACK_PENDING, ACK_SENT, ACK_FAILED = "pending", "sent", "failed"
# The acknowledgement status of a key's fate (a replay is answered with it).
_STATUS_OF = {HELD: RELAYED, RELAYED: RELAYED, FAILED: FAILED, VOIDED: VOIDED}
# Acknowledgements delivered, and keys passed to foreign KMSs, are kept this long (for operators), then forgotten;
# acknowledgements that failed stay.
SENT_ACKS_KEPT_SECONDS = 2 * 86400


@dataclass(frozen=True)
class Container:
    """What a foreign KMS asked about keys: who passed them, between which SAEs, where the acknowledgement goes."""

    foreign_kms_id: Id
    initiator_sae_id: Id
    target_sae_ids: tuple[Id, ...]
    key_ids: tuple[str, ...]
    ack_url: str


@dataclass(frozen=True)
class Outcome:
    """What became of some keys for one target SAE: one acknowledgement container of the draft."""

    target_sae_id: Id
    status: str
    key_ids: tuple[str, ...]
    message: str = ""

    def container(self, initiator_sae_id: Id) -> dict:
        """The draft's ack_container."""
        body = {"key_ids": [{"key_id": key_id} for key_id in self.key_ids], "ack_status": self.status,
                "initiator_sae_id": str(initiator_sae_id), "target_sae_id": str(self.target_sae_id)}
        if self.message:
            body["message"] = self.message
        return body


@dataclass(frozen=True)
class Ack:
    """An acknowledgement waiting in the outbox."""

    ack_id: int
    foreign_kms_id: int
    url: str
    body: str
    attempts: int


def claim(container: Container, keys: list[DeliveredKeyMaterial], local_targets: list[Id] | None) -> bool:
    """Take a container's keys in: True if they are new, False for a replay (answered again from what was
    recorded). ``local_targets``: the targets of this KME when every target is here (the keys are stored for
    them now, acknowledged ``relayed``), None when some go on by relay (the keys are only claimed, RELAYING).

    BadRequest, changing nothing, if a key ID is in use otherwise (passed before for other SAEs or by another
    KMS, or the ID of one of our own keys).
    """
    now = clock.utc_now()
    with write_transaction() as session:
        # One claim per foreign KMS at a time: a replay racing its original finds it (SQLite's write lock does so).
        statements.lock_name(session, f"interop/{ids.number(container.foreign_kms_id)}")
        known = rows.keys_by_id(session, list(container.key_ids))
        if known:
            _check_replay(container, known)
            order = {key_id: index for index, key_id in enumerate(container.key_ids)}
            known = sorted(known, key=lambda row: (order[row[0]], row[1]))
            _queue(session, container, [Outcome(_target_id(container, target), _STATUS_OF[state], (key_id,), reason)
                                        for key_id, target, _f, _i, state, reason in known if state != RELAYING])
            events.record(session, f"Foreign KMS {container.foreign_kms_id} passed keys {_named(container)} again: "
                                   "answered from what was recorded")
            return False
        if statements.any_delivered(session, list(container.key_ids)):
            raise BadRequest("keys: a key_id is in use at this KME", [{"duplicate_key_id": "a key_id is in use"}])
        rows.insert_keys(session, [(key_id, target, container.foreign_kms_id, container.initiator_sae_id, RELAYING, "",
                                    container.ack_url, now)
                                   for key_id in container.key_ids for target in container.target_sae_ids])
        if local_targets is not None:
            store_delivered(session, container.foreign_kms_id, container.initiator_sae_id, local_targets, keys, now)
            update_link(session, container.foreign_kms_id, added=[key.material for key in keys])
            relayed(session, container, keys, local_targets)
        return True


def relayed(transaction, container: Container, keys: list[DeliveredKeyMaterial], local_targets: list[Id]) -> None:
    """Every target holds the keys (ours here, the others at their KMEs): record it, count them on the foreign
    KMS's link and queue the ``relayed`` acknowledgements, in the caller's transaction (a relay's, or claim's)."""
    units = len(keys) * pool_keys_per_key(len(keys[0].material) * 8)
    update_link(transaction, container.foreign_kms_id, ingested=units, delivered=units)
    key_ids = list(container.key_ids)
    for target in container.target_sae_ids:
        rows.set_state(transaction, key_ids, target, RELAYING, HELD if target in local_targets else RELAYED)
    _queue(transaction, container, [Outcome(target, RELAYED, container.key_ids)
                                    for target in container.target_sae_ids])
    targets = " and ".join(map(str, container.target_sae_ids))
    events.record(transaction, f"Foreign KMS {container.foreign_kms_id} passed {len(keys)} keys from SAE "
                               f"{container.initiator_sae_id} for SAE {targets}: {_named(container)}")


def fail(container: Container, reason: str) -> bool:
    """A relay of a container's keys failed: record it and queue the ``failed`` acknowledgements; False if it was
    decided already."""
    with write_transaction() as session:
        moved = sum(rows.set_state(session, list(container.key_ids), target, RELAYING, FAILED, reason)
                    for target in container.target_sae_ids)
        if not moved:
            return False
        _queue(session, container, [Outcome(target, FAILED, container.key_ids, reason)
                                    for target in container.target_sae_ids])
        events.record(session, f"Foreign KMS {container.foreign_kms_id}: keys {_named(container)} for SAE "
                               f"{' and '.join(map(str, container.target_sae_ids))} failed: {reason}")
        return True


def relaying_before(before: str, limit: int = 100) -> list[tuple]:
    """(key_id, target_sae_id, foreign_kms_id, initiator_sae_id, ack_url) of keys still being relayed since before
    ``before``: their relay's worker died."""
    with read_connection() as connection:
        return rows.in_state_before(connection, RELAYING, before, limit)


def void(container: Container, all_keys: bool) -> list[Outcome]:
    """Discard keys a foreign KMS passed us, for each target SAE, before the SAE fetched them (ETSI 014 Get key with
    key IDs refuses them after); the outcomes, per target and status, also queued as acknowledgements.

    ``all_keys``: every key of the pair of SAEs (the draft's all_confirmation), not ``container.key_ids``.
    BadRequest, changing nothing, when none of the named keys was passed for these SAEs by this KMS.
    """
    with write_transaction() as session:
        statements.lock_name(session, f"interop/{ids.number(container.foreign_kms_id)}")
        known = rows.keys_of_pair(session, container.foreign_kms_id, container.initiator_sae_id,
                                  list(container.target_sae_ids))
        if not all_keys:
            named = set(container.key_ids)
            known = [row for row in known if row[0] in named]
            if not known:
                raise BadRequest("key not present", [{"key_not_present": "The requested key ID(s) are not available "
                                                                         "to be voided."}])
        outcomes = _void(session, container, known, all_keys)
        _queue(session, container, outcomes)
        events.record(session, *(f"Foreign KMS {container.foreign_kms_id} voided keys {', '.join(outcome.key_ids)} "
                                 f"for SAE {outcome.target_sae_id}: {outcome.status}"
                                 + (f" ({outcome.message})" if outcome.message else "") for outcome in outcomes))
        return outcomes


def _void(session, container: Container, known: list[tuple], all_keys: bool) -> list[Outcome]:
    states = {(key_id, target): state for key_id, target, state in known}
    found = statements.delivered_keys_and_slaves(statements.driver(session), sorted({row[0] for row in known}))
    waiting = {(key_id, slave) for key_id, _link, _master, _material, slave, fetched in found if not fetched}
    outcomes = []
    for target in container.target_sae_ids:
        number = ids.number(target)
        asked = list(container.key_ids)
        if all_keys:
            asked = sorted(key_id for key_id, stored in states if stored == number and (key_id, stored) in waiting)
            if not asked:
                outcomes.append(Outcome(target, NOT_PRESENT, (), "no key of these SAEs waits at this KME"))
                continue
        by_status: dict[tuple[str, str], list[str]] = {}
        for key_id in asked:
            status, message = _void_one(states.get((key_id, number)), (key_id, number) in waiting)
            by_status.setdefault((status, message), []).append(key_id)
        voided = [key_id for key_id in by_status.get((VOIDED, ""), []) if states.get((key_id, number)) == HELD]
        if voided:
            _erase_for(session, voided, number, waiting)
            rows.set_state(session, voided, target, HELD, VOIDED)
        outcomes.extend(Outcome(target, status, tuple(key_ids), message)
                        for (status, message), key_ids in by_status.items())
    return outcomes


def _void_one(state: str | None, waiting: bool) -> tuple[str, str]:
    """The draft's status (and message) of voiding one key for one target."""
    if state == HELD:
        return (VOIDED, "") if waiting else (FAILED, "the key was delivered to the SAE already, or expired")
    if state == VOIDED:
        return VOIDED, ""
    if state == RELAYED:
        return FAILED, "the key was relayed to the SAE's KME: a void reaches this KME only"
    if state == RELAYING:
        return FAILED, "the key is being relayed"
    return NOT_PRESENT, ""


def _erase_for(session, key_ids: list[str], slave: int, waiting: set) -> None:
    """Keys a slave will never fetch: erased where no other slave waits for them, else marked fetched by it."""
    others = {key_id for key_id, other in waiting if other != slave}
    shared = [key_id for key_id in key_ids if key_id in others]
    if shared:
        statements.mark_fetched(statements.driver(session), shared, slave)
    erase_delivered(session, [key_id for key_id in key_ids if key_id not in shared])


def _check_replay(container: Container, known: list[tuple]) -> None:
    foreign, initiator = ids.number(container.foreign_kms_id), ids.number(container.initiator_sae_id)
    targets = {ids.number(target) for target in container.target_sae_ids}
    found: dict[str, set] = {}
    for key_id, target, foreign_kms_id, initiator_sae_id, _state, _reason in known:
        if foreign_kms_id != foreign or initiator_sae_id != initiator:
            found[key_id] = set()
        else:
            found.setdefault(key_id, set()).add(target)
    if set(found) != set(container.key_ids) or any(stored != targets for stored in found.values()):
        raise BadRequest("keys: a key_id was passed before with other SAEs or by another KMS",
                         [{"duplicate_key_id": "a key_id of this container was passed before in another one"}])


def _target_id(container: Container, stored: int) -> Id:
    return next(target for target in container.target_sae_ids if ids.number(target) == stored)


def _queue(transaction, container: Container, outcomes: list[Outcome]) -> None:
    """Put the acknowledgement of ``outcomes`` (one container each) in the outbox."""
    merged: dict[tuple, list[str]] = {}
    for outcome in outcomes:
        merged.setdefault((outcome.target_sae_id, outcome.status, outcome.message), []).extend(outcome.key_ids)
    if not merged:
        return
    body = [Outcome(target, status, tuple(key_ids), message).container(container.initiator_sae_id)
            for (target, status, message), key_ids in merged.items()]
    rows.insert_ack(transaction, foreign_kms_id=container.foreign_kms_id, url=container.ack_url,
                    body=json.dumps(body), state=ACK_PENDING, attempts=0, next_at=time.time(), last_error="",
                    created_at=clock.utc_now())


def _named(container: Container) -> str:
    return ", ".join(container.key_ids)


def expect(transaction, foreign_kms_id: Id, initiator: Id, target: Id, key_ids: list[str]) -> None:
    """Keys about to be passed to a foreign KMS for ``target``, in the caller's transaction (the one that took them
    from a pool)."""
    now = clock.utc_now()
    rows.insert_sent(transaction, [(key_id, foreign_kms_id, initiator, target, SENDING, "", now)
                                   for key_id in key_ids])


def prepare_hand_over(foreign_kms_id: Id, initiator: Id, target: Id, key_ids: list[str]) -> list[DeliveredKeyMaterial]:
    """Keys that wait here for ``target`` (an SAE behind a foreign KMS: a peer's activation or relay stored them)
    and were never passed to it, opened and recorded as being passed: a retry never passes a key again."""
    with write_transaction() as session:
        known = {row[0] for row in rows.sent_by_id(session, key_ids)}
        fresh = [key_id for key_id in key_ids if key_id not in known]
        stored = statements.delivered_material(session, fresh)
        slaves = statements.slaves_of(session, fresh)
        expect(session, foreign_kms_id, initiator, target, [key_id for key_id, *_ in stored])
        return [DeliveredKeyMaterial(key_id, at_rest.open_delivered(key_id, link_id, master, slaves.get(key_id, ()),
                                                                    material))
                for key_id, link_id, master, material in stored]


def handed_over(key_ids: list[str]) -> None:
    """The foreign KMS acknowledged keys that waited here: erased (its SAE has them)."""
    with write_transaction() as session:
        erase_delivered(session, key_ids)


def sent_outcome(key_ids: list[str]) -> dict[str, tuple[str, str]]:
    """What became of keys passed to a foreign KMS: {key_id: (state, message)}."""
    with read_connection() as connection:
        return {key_id: (state, message) for key_id, _foreign, state, message
                in rows.sent_by_id(connection, key_ids)}


def acknowledged(foreign_kms_id: Id, outcomes: list[tuple[list[str], str, str]]) -> list[str]:
    """Record a foreign KMS's acknowledgements of keys we passed it ((key IDs, RELAYED or FAILED, message) each);
    the key IDs it names that were not passed to it, in which case nothing is recorded."""
    named = [key_id for key_ids, _state, _message in outcomes for key_id in key_ids]
    if not named:
        return []
    with write_transaction() as session:
        passed = {key_id for key_id, foreign, _state, _message in rows.sent_by_id(session, named)
                  if foreign == ids.number(foreign_kms_id)}
        unknown = [key_id for key_id in named if key_id not in passed]
        if unknown:
            return unknown
        for key_ids, state, message in outcomes:
            if key_ids:
                rows.set_sent(session, key_ids, SENDING, state, message)
        events.record(session, *(f"Foreign KMS {foreign_kms_id} acknowledged keys {', '.join(key_ids)}: {state}"
                                 + (f" ({message})" if message else "") for key_ids, state, message in outcomes
                                 if key_ids))
        return []


def give_up(key_ids: list[str], reason: str) -> None:
    """Keys passed to a foreign KMS that acknowledged nothing in time: failed (a later acknowledgement changes
    nothing)."""
    with write_transaction() as session:
        rows.set_sent(session, key_ids, SENDING, FAILED, reason)


def forget_sent(before: str) -> None:
    """Forget keys passed to foreign KMSs before ``before``."""
    with write_transaction() as session:
        rows.forget_sent(session, before)


def due_acks(limit: int = 50) -> list[Ack]:
    """Acknowledgements due to be sent (first attempts and retries), the longest waiting first."""
    with read_connection() as connection:
        return [Ack(*row) for row in rows.due_acks(connection, ACK_PENDING, time.time(), limit)]


def ack_sent(ack: Ack) -> None:
    """The foreign KMS took the acknowledgement."""
    with write_transaction() as session:
        rows.set_ack(session, ack.ack_id, ACK_SENT, ack.attempts + 1, time.time(), "")


def ack_retry(ack: Ack, error: str, next_at: float) -> None:
    """An attempt failed; the next one at ``next_at`` (epoch seconds)."""
    with write_transaction() as session:
        rows.set_ack(session, ack.ack_id, ACK_PENDING, ack.attempts + 1, next_at, error)


def ack_failed(ack: Ack, foreign_kms_id: Id, error: str) -> None:
    """No attempt is left: the acknowledgement stays in the outbox as failed, for operators."""
    with write_transaction() as session:
        rows.set_ack(session, ack.ack_id, ACK_FAILED, ack.attempts + 1, time.time(), error)
        events.record(session, f"Acknowledgement {ack.ack_id} to foreign KMS {foreign_kms_id} failed after "
                               f"{ack.attempts + 1} attempts: {error}")


def forget_sent_acks(before: str) -> None:
    """Delete the acknowledgements sent before ``before`` (failed ones stay)."""
    with write_transaction() as session:
        rows.forget_acks(session, ACK_SENT, before)


def summary() -> dict:
    """For operators: per foreign KMS (the stored number), its keys by state, its acknowledgements by state; the
    newest failed acknowledgements."""
    with read_connection() as connection:
        keys, acks = rows.state_counts(connection), rows.ack_counts(connection)
        failed = rows.acks_in_state(connection, ACK_FAILED, 20)
    by_kms: dict = {}
    for foreign, state, count in keys:
        by_kms.setdefault(foreign, {"keys": {}, "acks": {}})["keys"][state] = count
    for foreign, state, count in acks:
        by_kms.setdefault(foreign, {"keys": {}, "acks": {}})["acks"][state] = count
    return {"by_kms": by_kms, "failed_acks": failed}
