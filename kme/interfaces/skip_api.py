"""The Cisco SKIP interface (Secure Key Integration Protocol, draft-cisco-skip-02), as thin views over the same
domain calls as the SAE interface (docs/skip.md).

SKIP's system IDs are SAE IDs: the caller is the SAE its client certificate
names, ``remoteSystemID`` the SAE it shares a key with. A key made here is
a Get key of one key for that slave, fetched here or through ETSI 014 at
its KME, and the reverse: each side gets it once, whichever interface asks.
Keys and key IDs are hexadecimal (a key ID is its UUID's 32 digits).
"""
import secrets
import uuid

from flask import Blueprint, current_app

from kme.domain import delivery
from kme.errors import BadRequest
from kme.interfaces.sae_api import calling_sae, count_delivered, query_integer, single_query_values

bp = Blueprint("skip_api", __name__)

# What /entropy gives at most in one answer, in bits.
ENTROPY_MAX_BITS = 8192
ENTROPY_DEFAULT_BITS = 256
# What /capabilities says the keys come from.
ALGORITHM = "QKD"


def _config():
    return current_app.extensions["kme"]


def _remote(values: dict[str, str]) -> str:
    remote = values.get("remoteSystemID")
    if remote is None:
        raise BadRequest("remoteSystemID: missing")
    return remote


def _key_id(text: str) -> str:
    """A key ID as SKIP writes it (32 hex digits; the UUID's own form is accepted too), in canonical form."""
    if len(text) not in (32, 36) or not text.isascii():
        raise BadRequest("keyId: not a key ID (32 hexadecimal digits)")
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise BadRequest("keyId: not a key ID (32 hexadecimal digits)") from None


def _key(key) -> dict:
    return {"keyId": uuid.UUID(key.key_id).hex, "key": key.material.hex()}


@bp.get("/capabilities")
def capabilities():
    """What this Key Provider offers the calling system, and the systems it may share keys with."""
    sae = calling_sae()
    return {"entropy": True, "key": True, "algorithm": ALGORITHM, "localSystemID": sae.id,
            "remoteSystemID": [other.id for other in _config().saes if other.id != sae.id]}


@bp.get("/key")
def new_key():
    """A new key to share with ``remoteSystemID``: ETSI 014 Get key of one key for that slave SAE."""
    master = calling_sae()
    values = single_query_values(("remoteSystemID", "size"))
    remote = _remote(values)
    request = {"number": 1}
    if "size" in values:
        request["size"] = query_integer("size", values["size"])
    keys = delivery.get_key(_config(), master, remote, request)
    count_delivered(keys, master, remote, "master")
    return _key(keys[0])


@bp.get("/key/<key_id>")
def key_by_id(key_id: str):
    """The key ``remoteSystemID`` made for the caller: ETSI 014 Get key with key IDs, once."""
    slave = calling_sae()
    remote = _remote(single_query_values(("remoteSystemID",)))
    keys = delivery.get_key_with_key_ids(_config(), slave, remote, [_key_id(key_id)])
    count_delivered(keys, slave, remote, "slave")
    return _key(keys[0])


@bp.get("/entropy")
def entropy():
    """Random bits from the operating system's CSPRNG: never QKD key material, which is kept for keys."""
    calling_sae()
    text = single_query_values(("minentropy",)).get("minentropy")
    bits = ENTROPY_DEFAULT_BITS if text is None else query_integer("minentropy", text)
    if not 1 <= bits <= ENTROPY_MAX_BITS:
        raise BadRequest(f"minentropy shall be between 1 and {ENTROPY_MAX_BITS}")
    return {"randomStr": secrets.token_bytes((bits + 7) // 8).hex(), "minentropy": bits}
