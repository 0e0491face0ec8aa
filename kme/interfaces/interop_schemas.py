"""Marshmallow schemas of the ETSI GS QKD 020 draft 0.4.1 data formats (docs/interop.md).

Loading turns a request into plain values or raises BadRequest with a
one-line message naming the field; the rules that depend on the
configuration (which SAEs, which key sizes) are the domain's
(kme.domain.interop).
"""
import base64
import binascii

from marshmallow import Schema, ValidationError, fields, validate

from kme.config_schema import List, Nested, PlainMessages, Str, StrictSchema
from kme.interfaces.schemas import JsonObject, SaeId
from kme.key_ids import KeyIdField

# The draft's acknowledgement statuses.
ACK_STATUSES = ("relayed", "voided", "failed", "key not present")
_NOT_EMPTY = validate.Length(min=1, error="empty list")


class KeyValue(PlainMessages, fields.Field):
    """Key bytes in base64 (RFC 4648, Table 1, with its padding), at least one byte."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise ValidationError("not a base64 string")
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("not base64 (RFC 4648, with its padding)") from None
        if not decoded:
            raise ValidationError("an empty key")
        return decoded


class ExtKeySchema(StrictSchema):
    key_id = KeyIdField(required=True)
    value = KeyValue(required=True)
    extension = JsonObject()


class ExtKeyContainerSchema(StrictSchema):
    """Extended key request container (ext_keys): keys for the target SAEs, from the initiator SAE."""

    keys = List(Nested(ExtKeySchema), required=True, validate=_NOT_EMPTY)
    initiator_sae_id = SaeId(required=True)
    target_sae_ids = List(SaeId(), required=True, validate=_NOT_EMPTY)
    ack_callback_url = Str(required=True)
    extension_mandatory = JsonObject()
    extension_optional = JsonObject()


class VoidContainerSchema(StrictSchema):
    """Void request container (ext_keys/void); ``key_ids`` may be left out only with ``all_confirmation=true``."""

    key_ids = List(KeyIdField())
    initiator_sae_id = SaeId(required=True)
    target_sae_ids = List(SaeId(), required=True, validate=_NOT_EMPTY)
    ack_callback_url = Str(required=True)
    extension = JsonObject()


class AckKeyIdSchema(StrictSchema):
    key_id = KeyIdField(required=True)
    extension = JsonObject()


class AckContainerSchema(StrictSchema):
    """Acknowledgement container: what became of keys for one target SAE."""

    key_ids = List(Nested(AckKeyIdSchema), required=True)
    ack_status = Str(required=True, validate=validate.OneOf(ACK_STATUSES, error="not one of the draft's statuses"))
    initiator_sae_id = SaeId(required=True)
    target_sae_id = SaeId(required=True)
    message = Str()
    extension = JsonObject()


class VersionContainerSchema(Schema):
    """Version container: the API versions the KME supports."""

    versions = fields.List(fields.String(), required=True)


class ProblemSchema(Schema):
    """An error of the interop interface: an RFC 7807 problem carrying the draft's message data."""

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.List(fields.Dict())
