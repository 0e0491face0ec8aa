"""Marshmallow schemas of the ETSI GS QKD 014 data formats (clause 6).

Loading turns a request into plain values or raises BadRequest with a
one-line message naming the field; range checks that depend on the KME's
limits are the domain's (kme.domain.delivery).
"""
import base64
import json

from marshmallow import Schema, ValidationError, fields, validate
from werkzeug.exceptions import HTTPException

from kme import ids
from kme.config_schema import IdField, Int, List, Nested, PlainMessages, StrictSchema, first_error
from kme.errors import BadRequest
from kme.key_ids import KeyIdField


class JsonObject(fields.Dict):
    """A JSON object (extension parameters)."""

    default_error_messages = {"invalid": "not an object"}


class SaeId(PlainMessages, fields.Field):
    """An SAE ID as the standard writes it (a string; all digits names an integer ID), or as a JSON integer."""

    def _deserialize(self, value, attr, data, **kwargs):
        found = ids.from_json(value)
        if found is None:
            raise ValidationError("not an SAE ID")
        return found


class KeyRequestSchema(StrictSchema):
    """Key request (6.2); every field is optional."""

    number = Int()
    size = Int()
    additional_slave_SAE_IDs = List(SaeId())
    extension_mandatory = List(JsonObject())
    extension_optional = List(JsonObject())


class KeyIdSchema(StrictSchema):
    key_ID = KeyIdField(required=True)
    key_ID_extension = JsonObject()
    # Not in the standard: the C library under the strongSwan and OpenSSL QKD plugins names the master SAE in
    # every item; accepted when it is the master the URL names (checked by kme.domain.delivery).
    master_SAE_ID = SaeId()


class KeyIdsSchema(StrictSchema):
    """Key IDs (6.4)."""

    key_IDs = List(Nested(KeyIdSchema), required=True, validate=validate.Length(min=1, error="empty list"))
    key_IDs_extension = JsonObject()


class KeySchema(Schema):
    key_ID = fields.String(attribute="key_id", required=True, metadata={"format": "uuid"})
    key = fields.Function(lambda key: base64.b64encode(key.material).decode("ascii"), required=True,
                          metadata={"type": "string", "format": "byte"})


class KeyContainerSchema(Schema):
    """Key container (6.3)."""

    keys = fields.List(fields.Nested(KeySchema), required=True)


def key_container(keys) -> dict:
    """What KeyContainerSchema dumps, built directly: the schema's generic walk is most of the cost of 128 keys.

    KeyContainerSchema stays the documented format (OpenAPI); a test checks that the two agree.
    """
    return {"keys": [{"key_ID": key.key_id, "key": base64.b64encode(key.material).decode("ascii")} for key in keys]}


# The Status fields that the standard defines as strings; the domain gives them as integers.
_STATUS_IDS = frozenset({"source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID"})


def status_body(status: dict) -> dict:
    """What StatusSchema dumps, built directly: Get status is the most frequent call, and the schema's walk over
    eleven fields was a tenth of its cost. A test checks that the two agree."""
    return {name: str(value) if name in _STATUS_IDS else value for name, value in status.items()}


class StatusSchema(Schema):
    """Status (6.1); IDs are strings as the standard defines them. Every field is always present."""

    source_KME_ID = fields.String(required=True)
    target_KME_ID = fields.String(required=True)
    master_SAE_ID = fields.String(required=True)
    slave_SAE_ID = fields.String(required=True)
    key_size = fields.Integer(required=True)
    stored_key_count = fields.Integer(required=True)
    max_key_count = fields.Integer(required=True)
    max_key_per_request = fields.Integer(required=True)
    max_key_size = fields.Integer(required=True)
    min_key_size = fields.Integer(required=True)
    max_SAE_ID_count = fields.Integer(required=True)


class ErrorSchema(Schema):
    """Error (6.5)."""

    message = fields.String(required=True)
    details = fields.List(fields.Dict())


class SaeInfoSchema(Schema):
    """The calling SAE, as this KME knows it: its ID as configured (an integer or a string)."""

    SAE_ID = IdField(required=True)


class EntropySchema(Schema):
    """Shannon entropy, in bits per byte, of all key material the KME holds."""

    total_entropy = fields.Float(required=True)


_HEX = {"type": "string", "pattern": "^[0-9a-f]*$"}


class SkipCapabilitiesSchema(Schema):
    """SKIP capabilities: what the Key Provider offers the calling system, and the systems it shares keys with."""

    entropy = fields.Boolean(required=True)
    key = fields.Boolean(required=True)
    algorithm = fields.String(required=True)
    localSystemID = IdField(required=True)
    remoteSystemID = fields.List(IdField(), required=True)


class SkipKeySchema(Schema):
    """A SKIP key: its key ID (the UUID's 32 hexadecimal digits) and its bytes in hexadecimal."""

    keyId = fields.String(required=True, metadata={"pattern": "^[0-9a-f]{32}$"})
    key = fields.String(required=True, metadata=_HEX)


class SkipEntropySchema(Schema):
    """SKIP entropy: random bytes of the operating system's CSPRNG in hexadecimal, and the bits asked for."""

    randomStr = fields.String(required=True, metadata=_HEX)
    minentropy = fields.Integer(required=True)


def json_body(request, empty_default=None):
    """The request's JSON body; ``empty_default`` for an empty body if given, else 400 for every failure.

    A body that cannot be read (a broken chunked encoding) or parsed (not
    JSON, nested beyond Python's recursion limit) is the client's mistake.
    """
    try:
        raw = request.get_data(cache=True)
    except HTTPException:
        raise
    except Exception:  # noqa: BLE001 - servers raise their own types here (gunicorn: ParseException, IOError)
        raise BadRequest("the request body could not be read (broken transfer encoding)") from None
    if not raw.strip():
        if empty_default is None:
            raise BadRequest("the request body is empty: a JSON object is required")
        return empty_default
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None


def load(schema: Schema, data) -> dict:
    """Validate ``data``; a mistake becomes a 400 naming the first bad field."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        where, message = first_error(exc.messages)
        raise BadRequest(f"{where}: {message}") from None
