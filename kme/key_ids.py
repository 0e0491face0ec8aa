"""Key IDs as both interfaces write them: a UUID string, in canonical lower-case form."""
import uuid

from marshmallow import ValidationError, fields

from kme.config_schema import PlainMessages


class KeyIdField(PlainMessages, fields.Field):
    """A key ID: a UUID string, returned in canonical lower-case form."""

    def _deserialize(self, value, attr, data, **kwargs):
        return parse_key_id(value)


def parse_key_id(value) -> str:
    """Canonical form of a key ID, or ValidationError."""
    if not isinstance(value, str) or len(value) != 36:
        raise ValidationError("not a UUID")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValidationError("not a UUID") from None
