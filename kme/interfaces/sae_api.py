"""The SAE interface (ETSI GS QKD 014 clause 5), as thin views over kme.domain.delivery.

Each view: identity from the environ, schema load, one domain call, schema dump.
"""
from flask import Blueprint, current_app, g, request
from marshmallow import ValidationError

from kme.config import Sae
from kme.domain import delivery
from kme.errors import BadRequest, NotAuthorized
from kme.interfaces.identity import client_serial
from kme.interfaces.schemas import (
    KeyIdsSchema,
    KeyRequestSchema,
    SaeInfoSchema,
    json_body,
    key_container,
    load,
    status_body,
)
from kme.key_ids import parse_key_id
from kme.operations import metrics

bp = Blueprint("sae_api", __name__, url_prefix="/api/v1")

_KEY_QUERY = ("number", "size")
# One instance of each schema per process: building one per request costs more than using it.
_KEY_REQUEST, _KEY_IDS, _SAE_INFO = KeyRequestSchema(), KeyIdsSchema(), SaeInfoSchema()


def _config():
    return current_app.extensions["kme"]


def calling_sae() -> Sae:
    """The SAE whose verified client certificate made this request; 401 otherwise."""
    serial = client_serial(request.environ)
    if serial is None:
        raise NotAuthorized("a verified client certificate is required")
    sae = _config().local_saes_by_serial.get(serial)
    if sae is None:
        raise NotAuthorized("the client certificate is not registered for an SAE of this KME")
    g.caller = f"SAE {sae.id}"
    return sae


def count_delivered(keys: list, sae: Sae, other: str, role: str) -> None:
    """Count keys handed out to ``sae`` in its role, on the link of the other SAE the request named (text of its
    ID, already known to be registered): the metric kme_keys_delivered."""
    link = delivery.parse_sae_id(_config(), other).kme_id
    metrics.child(metrics.KEYS_DELIVERED, str(link), str(sae.id), role).inc(len(keys))


def single_query_values(allowed: tuple[str, ...], hint: str = "") -> dict[str, str]:
    """The query's values, each given at most once; 400 for a name not in ``allowed`` (the message ends with
    ``hint``)."""
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown query parameter{hint}")
    values = {}
    for name in allowed:
        given = request.args.getlist(name)
        if len(given) > 1:
            raise BadRequest(f"{name}: given more than once")
        if given:
            values[name] = given[0]
    return values


def _post_hint(allowed: tuple[str, ...]) -> str:
    """What a GET of the standard may not carry in its query, its POST may in its body."""
    return f" (use POST for anything but {', '.join(allowed)})"


def _key_request() -> dict:
    if request.method == "POST":
        return load(_KEY_REQUEST, json_body(request, empty_default={}))
    values = single_query_values(_KEY_QUERY, _post_hint(_KEY_QUERY))
    return {name: query_integer(name, text) for name, text in values.items()}


def query_integer(name: str, text: str) -> int:
    """A query value that must be a decimal integer; 400 naming it otherwise."""
    if not (text.isascii() and text.removeprefix("-").isdigit()):
        raise BadRequest(f"{name}: not an integer")
    return int(text)


def _key_ids() -> tuple[list[str], set]:
    """The key IDs asked for, and the master SAE IDs the items name (a client's dialect)."""
    if request.method == "POST":
        items = load(_KEY_IDS, json_body(request))["key_IDs"]
        return [item["key_ID"] for item in items], {item["master_SAE_ID"] for item in items if "master_SAE_ID" in item}
    key_id = single_query_values(("key_ID",), _post_hint(("key_ID",))).get("key_ID")
    if key_id is None:
        raise BadRequest("key_ID: missing")
    try:
        return [parse_key_id(key_id)], set()
    except ValidationError:
        raise BadRequest("key_ID: not a UUID") from None


@bp.get("/keys/<slave_sae_id>/status")
def get_status(slave_sae_id: str):
    """Get status (5.2)."""
    master = calling_sae()
    return status_body(delivery.get_status(_config(), master, slave_sae_id))


@bp.route("/keys/<slave_sae_id>/enc_keys", methods=["GET", "POST"])
def get_key(slave_sae_id: str):
    """Get key (5.3)."""
    master = calling_sae()
    keys = delivery.get_key(_config(), master, slave_sae_id, _key_request())
    count_delivered(keys, master, slave_sae_id, "master")
    return key_container(keys)


@bp.route("/keys/<master_sae_id>/dec_keys", methods=["GET", "POST"])
def get_key_with_key_ids(master_sae_id: str):
    """Get key with key IDs (5.4)."""
    slave = calling_sae()
    key_ids, named_masters = _key_ids()
    keys = delivery.get_key_with_key_ids(_config(), slave, master_sae_id, key_ids, named_masters)
    count_delivered(keys, slave, master_sae_id, "slave")
    return key_container(keys)


@bp.get("/sae/info/me")
def sae_info_me():
    """The calling SAE's ID, as this KME knows it."""
    return _SAE_INFO.dump({"SAE_ID": calling_sae().id})


@bp.get("/keys/entropy/total")
def total_entropy():
    """Shannon entropy (bits per byte) of all key material this KME holds."""
    calling_sae()
    # EntropySchema is the documented format; its dump of one float is that float.
    return {"total_entropy": delivery.total_entropy()}
