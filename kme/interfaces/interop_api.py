"""The interop interface (ETSI GS QKD 020 draft 0.4.1): another vendor's key management system in the same trusted
node, known by its client certificate (docs/interop.md).

Every route answers a caller that is not a configured foreign KMS with
401; every error is an RFC 7807 problem (kme.interfaces.http_errors).
"""
from flask import Blueprint, current_app, g, request

from kme.config import ForeignKms
from kme.domain import interop
from kme.errors import BadRequest, NotAuthorized
from kme.interfaces.identity import client_serial
from kme.interfaces.interop_schemas import AckContainerSchema, ExtKeyContainerSchema, VoidContainerSchema
from kme.interfaces.schemas import json_body, load
from kme.storage.keystore.common import DeliveredKeyMaterial

bp = Blueprint("interop_api", __name__, url_prefix="/kmapi")

# The API versions of the draft this KME serves.
VERSIONS = ("v1",)
_EXT_KEYS, _VOID, _ACKS = ExtKeyContainerSchema(), VoidContainerSchema(), AckContainerSchema(many=True)
# What the all_confirmation query parameter may say.
_BOOLEANS = {"true": True, "false": False}


def calling_foreign_kms() -> ForeignKms:
    """The foreign KMS whose verified client certificate made this request; 401 otherwise."""
    serial = client_serial(request.environ)
    if serial is None:
        raise NotAuthorized("a verified client certificate is required")
    foreign = current_app.extensions["kme"].foreign_kms_by_serial.get(serial)
    if foreign is None:
        raise NotAuthorized("the client certificate is not registered for a foreign KMS of this KME")
    g.caller = f"foreign KMS {foreign.id}"
    return foreign


@bp.get("/versions")
def versions():
    """The versions of the API this KME supports, newest last."""
    calling_foreign_kms()
    return {"versions": list(VERSIONS)}


@bp.post("/v1/ext_keys")
def ext_keys():
    """Keys for target SAEs of our network, from an SAE behind the calling foreign KMS: 202, then an
    acknowledgement per target at ``ack_callback_url``."""
    foreign = calling_foreign_kms()
    container = load(_EXT_KEYS, json_body(request))
    keys = [DeliveredKeyMaterial(key["key_id"], key["value"]) for key in container["keys"]]
    interop.receive(current_app.extensions["kme"], foreign, keys, container["initiator_sae_id"],
                    container["target_sae_ids"], container["ack_callback_url"], container.get("extension_mandatory"))
    return "", 202


@bp.post("/v1/ext_keys/void")
def void():
    """Discard keys the calling foreign KMS passed us (all of a pair of SAEs with ``?all_confirmation=true`` and no
    key_ids): 202, then acknowledgements at ``ack_callback_url``."""
    foreign = calling_foreign_kms()
    confirmation = request.args.get("all_confirmation", "false").lower()
    if confirmation not in _BOOLEANS:
        raise BadRequest("all_confirmation: true or false")
    container = load(_VOID, json_body(request))
    interop.void(current_app.extensions["kme"], foreign, container.get("key_ids"), container["initiator_sae_id"],
                 container["target_sae_ids"], container["ack_callback_url"], _BOOLEANS[confirmation])
    return "", 202


@bp.post("/v1/ext_keys/ack")
def ack():
    """Acknowledgements of keys this KME passed the calling foreign KMS: 200 once recorded."""
    foreign = calling_foreign_kms()
    interop.acknowledged(foreign, load(_ACKS, json_body(request)))
    return "", 200
