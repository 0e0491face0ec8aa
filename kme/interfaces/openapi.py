"""The OpenAPI 3 documents of the SAE, inter-KME, SKIP and interop interfaces, built from the marshmallow schemas.

``document("sae")``, ``document("kme")``, ``document("skip")`` and ``document("interop")`` are served by each
interface at ``/api/v1/openapi.json``; ``document("all")`` (every one) is written to
docs/openapi.json by ``make openapi``, and a test checks that the file and
the code agree.
"""
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, current_app

from kme import ids
from kme.interfaces.http_errors import MEANINGS
from kme.interfaces.interop_schemas import (
    AckContainerSchema,
    ExtKeyContainerSchema,
    ProblemSchema,
    VersionContainerSchema,
    VoidContainerSchema,
)
from kme.interfaces.schemas import (
    EntropySchema,
    ErrorSchema,
    KeyContainerSchema,
    KeyIdField,
    KeyIdsSchema,
    KeyRequestSchema,
    SaeId,
    SaeInfoSchema,
    SkipCapabilitiesSchema,
    SkipEntropySchema,
    SkipKeySchema,
    StatusSchema,
)
from kme.interfaces.skip_api import ENTROPY_DEFAULT_BITS, ENTROPY_MAX_BITS
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

bp = Blueprint("openapi", __name__)

_SAE_ERRORS = (400, 401, 404, 405, 413, 503)
_KME_ERRORS = (400, 401, 403, 404, 405, 409, 413, 503)
_INTEROP_ERRORS = (400, 401, 404, 405, 413, 503)
# Answers without a body: (status, meaning).
_WITHOUT_BODY = {"accepted": ("202", "Accepted: acknowledgements follow at ack_callback_url"),
                 "recorded": ("200", "The acknowledgements are recorded")}


def _sae_id(name: str) -> dict:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "pattern": f"^{ids.PATTERN}$"},
            "description": "an SAE ID: the decimal digits of an integer ID, or a string ID as configured"}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _operation(summary: str, answer, errors, parameters=(), body=None, problem: bool = False) -> dict:
    """An operation: its answer (a schema, or a key of _WITHOUT_BODY), its errors (ETSI Error bodies, or RFC 7807
    problems with ``problem``), its parameters and body."""
    error = {"application/problem+json": {"schema": ProblemSchema}} if problem else \
        {"application/json": {"schema": ErrorSchema}}
    if answer in _WITHOUT_BODY:
        responses = {_WITHOUT_BODY[answer][0]: {"description": _WITHOUT_BODY[answer][1]}}
    else:
        responses = {"200": {"description": "OK", "content": {"application/json": {"schema": answer}}}}
    responses.update({str(code): {"description": MEANINGS[code], "content": error} for code in errors})
    operation = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = list(parameters)
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return operation


def _sae_paths() -> dict:
    number = _query("number", {"type": "integer"}, "number of keys (default 1)")
    size = _query("size", {"type": "integer"}, "key size in bits (default: key_size of the status)")
    key_id = {"name": "key_ID", "in": "query", "required": True, "schema": {"type": "string", "format": "uuid"}}
    get_key = "Get key (ETSI GS QKD 014 5.3): new keys for the calling master SAE to share with the slave SAE"
    get_key_ids = "Get key with key IDs (5.4): the keys a master SAE obtained for the calling slave SAE"
    return {
        "/api/v1/keys/{slave_SAE_ID}/status": {"get": _operation(
            "Get status (5.2) of the link between the calling SAE and a slave SAE", StatusSchema, _SAE_ERRORS,
            [_sae_id("slave_SAE_ID")])},
        "/api/v1/keys/{slave_SAE_ID}/enc_keys": {
            "get": _operation(get_key, KeyContainerSchema, _SAE_ERRORS, [_sae_id("slave_SAE_ID"), number, size]),
            "post": _operation(get_key, KeyContainerSchema, _SAE_ERRORS, [_sae_id("slave_SAE_ID")],
                               KeyRequestSchema)},
        "/api/v1/keys/{master_SAE_ID}/dec_keys": {
            "get": _operation(get_key_ids, KeyContainerSchema, _SAE_ERRORS, [_sae_id("master_SAE_ID"), key_id]),
            "post": _operation(get_key_ids, KeyContainerSchema, _SAE_ERRORS, [_sae_id("master_SAE_ID")],
                               KeyIdsSchema)},
        "/api/v1/sae/info/me": {"get": _operation("The calling SAE's ID", SaeInfoSchema, _SAE_ERRORS)},
        "/api/v1/keys/entropy/total": {"get": _operation(
            "Shannon entropy, in bits per byte, of all key material the KME holds", EntropySchema, _SAE_ERRORS)},
    }


_RELAY_MAC = {"name": RELAY_MAC_HEADER, "in": "header", "required": True,
              "description": "base64 of the 16-byte one-time Poly1305 tag of the body, keyed with the key material "
                             "of mac_part", "schema": {"type": "string"}}


def _kme_paths() -> dict:
    activation_id = {"name": "activation_ID", "in": "path", "required": True,
                     "schema": {"type": "string", "format": "uuid"}}
    return {
        "/api/v1/kme/activations": {"post": _operation(
            "Activate keys of the calling KME's direction of the link for its master SAE and our slave SAEs "
            "(idempotent by activation_ID)", ActivatedSchema, _KME_ERRORS, body=ActivationSchema)},
        "/api/v1/kme/activations/{activation_ID}/cancel": {"post": _operation(
            "Make sure an activation never takes effect (idempotent); the body repeats the activation",
            CancelledSchema, _KME_ERRORS, [activation_id], ActivationSchema)},
        "/api/v1/kme/relays": {"post": _operation(
            "Take a relay through trusted nodes: keys for our slave SAEs and those behind our next hops, under "
            "one-time pads of the hop's link; answered once every hop after this KME committed (idempotent by "
            "activation_ID)", ActivatedSchema, _KME_ERRORS, [_RELAY_MAC], RelaySchema)},
        "/api/v1/kme/relays/{activation_ID}/cancel": {"post": _operation(
            "Make sure a relay hop never takes effect here nor on any hop after it (idempotent)",
            CancelledSchema, _KME_ERRORS, [activation_id], RelayCancelSchema)},
        "/api/v1/kme/relays/{activation_ID}/release": {"post": _operation(
            "A multicast relay was decided: its slave SAEs here and after may fetch its keys (idempotent)",
            ReleasedSchema, _KME_ERRORS, [activation_id], RelayCancelSchema)},
        "/api/v1/kme/leases": {"post": _operation(
            "Lend keys of this KME's direction of the link to the calling KME's (idempotent by lease_ID)",
            LeaseAnswerSchema, _KME_ERRORS, body=LeaseSchema)},
        "/api/v1/kme/leases/states": {"post": _operation(
            "What this KME, as the borrower, did with leases the calling KME gave it: applied, pending, unknown",
            LeaseStatesAnswerSchema, _KME_ERRORS, body=LeaseStatesSchema)},
        "/api/v1/kme/progress": {"post": _operation(
            "Exchange ingestion progress: which keys of each file each end holds", ProgressAnswerSchema,
            _KME_ERRORS, body=ProgressSchema)},
        "/api/v1/kme/streams/open": {"post": _operation(
            "The slave SAE of an ETSI GS QKD 004 stream whose master is an SAE of this KME opened its end at the "
            "calling KME: the stream as this KME has it", StreamOpenAnswerSchema, _KME_ERRORS, body=StreamOpenSchema)},
        "/api/v1/kme/streams/chunks": {"post": _operation(
            "Make a chunk of an ETSI GS QKD 004 stream whose master is an SAE of this KME, activated at the calling "
            "KME before the answer", StreamChunkAnswerSchema, _KME_ERRORS, body=StreamChunkSchema)},
        "/api/v1/kme/streams/close": {"post": _operation(
            "An end of an ETSI GS QKD 004 stream closed it at the calling KME: closed here too (idempotent)",
            StreamClosedSchema, _KME_ERRORS, body=StreamCloseSchema)},
    }


def _skip_paths() -> dict:
    remote = {"name": "remoteSystemID", "in": "query", "required": True, "schema": {"type": "string"},
              "description": "the SAE ID of the other system (docs/skip.md)"}
    size = _query("size", {"type": "integer"}, "key size in bits (default: key_size of the KME)")
    key_id = {"name": "keyId", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"},
              "description": "the key's ID: its UUID's 32 hexadecimal digits"}
    minentropy = _query("minentropy", {"type": "integer", "minimum": 1, "maximum": ENTROPY_MAX_BITS},
                        f"bits wanted (default {ENTROPY_DEFAULT_BITS})")
    return {
        "/capabilities": {"get": _operation("SKIP capabilities: the calling system and those it may share keys with",
                                            SkipCapabilitiesSchema, _SAE_ERRORS)},
        "/key": {"get": _operation("SKIP new key, shared with remoteSystemID (ETSI 014 Get key of one key)",
                                   SkipKeySchema, _SAE_ERRORS, [remote, size])},
        "/key/{keyId}": {"get": _operation("SKIP key by its ID, made by remoteSystemID (ETSI 014 Get key with key IDs)",
                                           SkipKeySchema, _SAE_ERRORS, [key_id, remote])},
        "/entropy": {"get": _operation("SKIP entropy: random bytes of the operating system's CSPRNG, never key "
                                       "material", SkipEntropySchema, _SAE_ERRORS, [minentropy])},
    }


def _interop_paths() -> dict:
    confirmation = _query("all_confirmation", {"type": "boolean"},
                          "true: void every key of the SAEs named when the body names no key_ids")
    return {
        "/kmapi/versions": {"get": _operation(
            "ETSI GS QKD 020 (draft 0.4.1): the API versions this KME supports", VersionContainerSchema, (401, 503),
            problem=True)},
        "/kmapi/v1/ext_keys": {"post": _operation(
            "Keys from an SAE behind the calling foreign KMS for target SAEs of our network (docs/interop.md)",
            "accepted",
            _INTEROP_ERRORS, body=ExtKeyContainerSchema, problem=True)},
        "/kmapi/v1/ext_keys/void": {"post": _operation(
            "Discard keys the calling foreign KMS passed before their target SAEs fetched them", "accepted",
            _INTEROP_ERRORS, [confirmation], body=VoidContainerSchema, problem=True)},
        "/kmapi/v1/ext_keys/ack": {"post": _operation(
            "Acknowledgements of keys this KME passed the calling foreign KMS (one container per target SAE)",
            "recorded", _INTEROP_ERRORS, body=AckContainerSchema(many=True), problem=True)},
    }


_TITLES = {"sae": "KME SAE interface (ETSI GS QKD 014)", "kme": "KME inter-KME interface",
           "skip": "KME Cisco SKIP interface (draft-cisco-skip-02)",
           "interop": "KME interop interface (Draft ETSI GS QKD 020 0.4.1)",
           "all": "KME: SAE (ETSI GS QKD 014), inter-KME, Cisco SKIP and interop (ETSI GS QKD 020) interfaces"}
_PATHS = {"sae": _sae_paths, "kme": _kme_paths, "skip": _skip_paths, "interop": _interop_paths}


def document(interface: str) -> dict:
    """The OpenAPI 3 document of ``interface``: "sae", "kme", "skip", "interop", or "all" (every one, as in
    docs/openapi.json)."""
    plugin = MarshmallowPlugin()
    spec = APISpec(title=_TITLES[interface], version="1", openapi_version="3.0.3", plugins=[plugin],
                   info={"description": "Mutual TLS: the caller is identified by its client certificate. "
                                        "Every error answer is an ETSI Error body."})
    plugin.map_to_openapi_type(KeyIdField, "string", "uuid")
    plugin.map_to_openapi_type(SaeId, "string", None)
    paths = {path: operations for name, build in _PATHS.items() if interface in (name, "all")
             for path, operations in build().items()}
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


@bp.get("/api/v1/openapi.json")
def openapi_json():
    """This interface's OpenAPI 3 document."""
    return document(current_app.extensions["kme_interface"])
