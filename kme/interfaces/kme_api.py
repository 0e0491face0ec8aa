"""The inter-KME interface: activations asked by peer KMEs (wire format: docs/inter-kme-protocol.md).

The calling KME is identified by its client certificate and may act only on
its own link with this KME.
"""
import base64
import binascii

from flask import Blueprint, current_app, g, request
from marshmallow import ValidationError

from kme.config import OtherKme
from kme.domain import activation, relay, sharing, streams
from kme.errors import BadRequest, NotAuthorized
from kme.interfaces.identity import client_serial
from kme.interfaces.schemas import json_body, load
from kme.key_ids import parse_key_id
from kme.key_math import one_time
from kme.peers.wire import (
    RELAY_MAC_HEADER,
    ActivatedSchema,
    ActivationSchema,
    CancelledSchema,
    LeaseAnswerSchema,
    LeaseSchema,
    LeaseStatesAnswerSchema,
    LeaseStatesSchema,
    ProgressAnswerSchema,
    ProgressSchema,
    RelayCancelSchema,
    RelaySchema,
    ReleasedSchema,
    StreamChunkAnswerSchema,
    StreamChunkSchema,
    StreamClosedSchema,
    StreamCloseSchema,
    StreamOpenAnswerSchema,
    StreamOpenSchema,
)
from kme.storage.keystore.incoming import ActivationRequest
from kme.storage.keystore.relays import Message

bp = Blueprint("kme_api", __name__, url_prefix="/api/v1/kme")

# One instance of each schema per process: building one (and its nested schemas) per request costs more than
# using it.
_ACTIVATION, _ACTIVATED, _CANCELLED = ActivationSchema(), ActivatedSchema(), CancelledSchema()
_LEASE, _LEASE_ANSWER = LeaseSchema(), LeaseAnswerSchema()
_LEASE_STATES, _LEASE_STATES_ANSWER = LeaseStatesSchema(), LeaseStatesAnswerSchema()
_PROGRESS, _PROGRESS_ANSWER = ProgressSchema(), ProgressAnswerSchema()
_RELAY, _RELAY_CANCEL, _RELEASED = RelaySchema(), RelayCancelSchema(), ReleasedSchema()
_STREAM_OPEN, _STREAM_OPEN_ANSWER = StreamOpenSchema(), StreamOpenAnswerSchema()
_STREAM_CHUNK, _STREAM_CHUNK_ANSWER = StreamChunkSchema(), StreamChunkAnswerSchema()
_STREAM_CLOSE, _STREAM_CLOSED = StreamCloseSchema(), StreamClosedSchema()


def calling_kme() -> OtherKme:
    """The peer KME whose verified client certificate made this request; 401 otherwise."""
    serial = client_serial(request.environ)
    peer = None if serial is None else current_app.extensions["kme"].peer_by_serial(serial)
    if peer is None:
        raise NotAuthorized("the client certificate is not registered for a KME linked to this KME")
    g.caller = f"KME {peer.id}"
    return peer


def _activation_request() -> ActivationRequest:
    data = load(_ACTIVATION, json_body(request))
    return ActivationRequest(
        activation_id=data["activation_ID"],
        master_sae_id=data["master_SAE_ID"],
        slave_ids=data["slave_SAE_IDs"],
        size_bits=data["size"],
        keys=[(key["key_ID"], [(part["file"], part["position"]) for part in key["parts"]]) for key in data["keys"]],
        stream=data.get("stream"),
    )


@bp.post("/activations")
def activate():
    """Activate keys of the caller's direction of our link for its master SAE and our slave SAEs."""
    caller = calling_kme()
    wanted = _activation_request()
    accept = streams.accept_chunk if wanted.stream else activation.accept_activation
    count = accept(current_app.extensions["kme"], caller, wanted)
    return _ACTIVATED.dump({"activation_ID": wanted.activation_id, "activated": count})


@bp.post("/activations/<activation_id>/cancel")
def cancel(activation_id: str):
    """Make sure an activation never takes effect (idempotent)."""
    caller = calling_kme()
    try:
        activation_id = parse_key_id(activation_id)
    except ValidationError:
        raise BadRequest("activation ID: not a UUID") from None
    wanted = _activation_request()
    if wanted.activation_id != activation_id:
        raise BadRequest("activation_ID: differs from the URL")
    activation.cancel_activation(current_app.extensions["kme"], caller, wanted)
    return _CANCELLED.dump({"activation_ID": activation_id, "state": "cancelled"})


@bp.post("/leases")
def lease():
    """Lend keys of our direction of the link to the caller's (idempotent by lease_ID)."""
    caller = calling_kme()
    data = load(_LEASE, json_body(request))
    runs, free = sharing.lend(current_app.extensions["kme"], caller, data)
    return _LEASE_ANSWER.dump({"lease_ID": data["lease_ID"], "runs": runs, "free": free})


@bp.post("/leases/states")
def lease_states():
    """What this KME, as the borrower, did with leases the caller gave it (applied, pending, unknown)."""
    caller = calling_kme()
    data = load(_LEASE_STATES, json_body(request))
    return _LEASE_STATES_ANSWER.dump(sharing.lease_states(caller, data["lease_IDs"]))


@bp.post("/progress")
def progress():
    """Take the caller's ingestion progress; answer with ours."""
    caller = calling_kme()
    data = load(_PROGRESS, json_body(request))
    return _PROGRESS_ANSWER.dump(sharing.answer_progress(current_app.extensions["kme"], caller, data))


def _relay_message() -> tuple[Message, bytes, bytes]:
    """The relay message of this request, its body as sent and the one-time MAC of its header."""
    body = request.get_data()
    data = load(_RELAY, json_body(request))
    try:
        mac = base64.b64decode(request.headers.get(RELAY_MAC_HEADER, ""), validate=True)
    except binascii.Error:
        mac = b""
    if len(mac) != one_time.TAG_BYTES:
        raise BadRequest(f"{RELAY_MAC_HEADER}: missing, or not the base64 of a {one_time.TAG_BYTES}-byte tag")
    targets: dict[int, list[int]] = {}
    for target in data["targets"]:
        if target["kme_ID"] in targets:
            raise BadRequest(f"targets: KME {target['kme_ID']} named twice")
        targets[target["kme_ID"]] = target["slave_SAE_IDs"]
    message = Message(
        activation_id=data["activation_ID"], relay_id=data["relay_ID"], path=data["path"],
        master_sae_id=data["master_SAE_ID"], size_bits=data["size"], hold=data["hold"],
        timeout_seconds=data["timeout_ms"] / 1000, targets=targets,
        keys=[(key["key_ID"], [(part["file"], part["position"]) for part in key["parts"]],
               _sealed(key.get("sealed"))) for key in data["keys"]],
        mac_part=(data["mac_part"]["file"], data["mac_part"]["position"]),
    )
    return message, body, mac


def _sealed(text: str | None) -> bytes | None:
    """The bytes of a ``sealed`` field (400 if it is not base64)."""
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise BadRequest("sealed: not base64") from None


def _relay_hop(activation_id: str) -> tuple[str, list[tuple[str, int]]]:
    try:
        activation_id = parse_key_id(activation_id)
    except ValidationError:
        raise BadRequest("activation ID: not a UUID") from None
    data = load(_RELAY_CANCEL, json_body(request))
    if data["activation_ID"] != activation_id:
        raise BadRequest("activation_ID: differs from the URL")
    return activation_id, [(part["file"], part["position"]) for part in data["parts"]]


@bp.post("/relays")
def relay_keys():
    """Take a relay from the caller; answered once every hop after this KME committed it."""
    caller = calling_kme()
    message, body, mac = _relay_message()
    count = activation.accept_relay(current_app.extensions["kme"], caller, message, body, mac)
    return _ACTIVATED.dump({"activation_ID": message.activation_id, "activated": count})


@bp.post("/relays/<activation_id>/cancel")
def cancel_relay(activation_id: str):
    """Make sure a relay hop never takes effect here, nor on any hop after it (idempotent)."""
    caller = calling_kme()
    activation_id, parts = _relay_hop(activation_id)
    relay.cancel(current_app.extensions["kme"], caller, activation_id, parts)
    return _CANCELLED.dump({"activation_ID": activation_id, "state": "cancelled"})


@bp.post("/relays/<activation_id>/release")
def release_relay(activation_id: str):
    """A multicast relay was decided: its slaves here may fetch the keys; the next hops hear it too (idempotent)."""
    caller = calling_kme()
    activation_id, _parts = _relay_hop(activation_id)
    relay.release(current_app.extensions["kme"], caller, activation_id)
    return _RELEASED.dump({"activation_ID": activation_id, "state": "released"})


@bp.post("/streams/open")
def stream_open():
    """The slave SAE of an ETSI GS QKD 004 stream whose master is ours opened its end at the caller."""
    caller = calling_kme()
    data = load(_STREAM_OPEN, json_body(request))
    status, chunk_size, ttl = streams.accept_slave_open(current_app.extensions["kme"], caller, data)
    return _STREAM_OPEN_ANSWER.dump({"KSID": data["KSID"], "status": status, "chunk_size": chunk_size, "ttl": ttl})


@bp.post("/streams/chunks")
def stream_chunk():
    """Make a chunk of a stream whose master is ours, activated at the caller (the slave's KME) before this
    answers."""
    caller = calling_kme()
    data = load(_STREAM_CHUNK, json_body(request))
    status = streams.accept_chunk_request(current_app.extensions["kme"], caller, data["KSID"], data["index"])
    return _STREAM_CHUNK_ANSWER.dump({"KSID": data["KSID"], "index": data["index"], "status": status})


@bp.post("/streams/close")
def stream_close():
    """An end of a stream between an SAE of ours and one of the caller's closed it at the caller (idempotent)."""
    caller = calling_kme()
    data = load(_STREAM_CLOSE, json_body(request))
    streams.accept_close(current_app.extensions["kme"], caller, data["KSID"])
    return _STREAM_CLOSED.dump({"KSID": data["KSID"], "state": "closed"})
