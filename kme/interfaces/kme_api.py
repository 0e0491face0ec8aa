"""The inter-KME interface: activations asked by peer KMEs (wire format: docs/inter-kme-protocol.md).

The calling KME is identified by its client certificate and may act only on
its own link with this KME.
"""
from flask import Blueprint, current_app, g, request
from marshmallow import ValidationError, validate

from kme.config import OtherKme
from kme.config_schema import Int, List, Nested, Str, StrictSchema
from kme.domain import activation
from kme.domain.errors import BadRequest, NotAuthorized
from kme.interfaces.identity import client_serial
from kme.interfaces.schemas import KeyIdField, json_body, load, parse_key_id
from kme.storage.keystore.incoming import ActivationRequest

bp = Blueprint("kme_api", __name__, url_prefix="/api/v1/kme")


class PartSchema(StrictSchema):
    file = Str(required=True, validate=validate.Length(1, 255))
    position = Int(required=True, validate=validate.Range(0, 2**62))


class WireKeySchema(StrictSchema):
    key_ID = KeyIdField(required=True)
    parts = List(Nested(PartSchema), required=True, validate=validate.Length(min=1))


class ActivationSchema(StrictSchema):
    activation_ID = KeyIdField(required=True)
    master_SAE_ID = Int(required=True)
    slave_SAE_IDs = List(Int(), required=True, validate=validate.Length(min=1))
    size = Int(required=True)
    keys = List(Nested(WireKeySchema), required=True, validate=validate.Length(min=1))


class ActivatedSchema(StrictSchema):
    """The answer to an activation."""

    activation_ID = KeyIdField(required=True)
    activated = Int(required=True)


class CancelledSchema(StrictSchema):
    """The answer to a cancel."""

    activation_ID = KeyIdField(required=True)
    state = Str(required=True, validate=validate.OneOf(["cancelled"]))


def calling_kme() -> OtherKme:
    """The peer KME whose verified client certificate made this request; 401 otherwise."""
    serial = client_serial(request.environ)
    peer = None if serial is None else current_app.extensions["kme"].peer_by_serial(serial)
    if peer is None:
        raise NotAuthorized("the client certificate is not registered for a KME linked to this KME")
    g.caller = f"KME {peer.id}"
    return peer


def _activation_request() -> ActivationRequest:
    data = load(ActivationSchema(), json_body(request))
    return ActivationRequest(
        activation_id=data["activation_ID"],
        master_sae_id=data["master_SAE_ID"],
        slave_ids=data["slave_SAE_IDs"],
        size_bits=data["size"],
        keys=[(key["key_ID"], [(part["file"], part["position"]) for part in key["parts"]]) for key in data["keys"]],
    )


@bp.post("/activations")
def activate():
    """Activate keys of the caller's direction of our link for its master SAE and our slave SAEs."""
    caller = calling_kme()
    wanted = _activation_request()
    count = activation.accept_activation(current_app.extensions["kme"], caller, wanted)
    return ActivatedSchema().dump({"activation_ID": wanted.activation_id, "activated": count})


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
    return CancelledSchema().dump({"activation_ID": activation_id, "state": "cancelled"})
