"""Marshmallow schemas for the KME configuration file (see docs/configuration.md).

They only check shape and types and turn the JSON into plain dicts; cross-field
rules and file checks live in kme.config, which builds the frozen dataclasses.
"""
import re

from marshmallow import Schema, ValidationError, fields, validate

from kme import ids

_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


def first_error(messages, prefix=""):
    """Walk marshmallow's nested error dict to the first leaf: (dotted path, message)."""
    return next(all_errors(messages, prefix))


def all_errors(messages, prefix=""):
    """Every leaf of marshmallow's nested error dict, in the order of the fields: (dotted path, message)."""
    if isinstance(messages, dict):
        for key in sorted(messages, key=lambda k: (isinstance(k, str), str(k))):
            if key == "_schema":
                yield from all_errors(messages[key], prefix)
                continue
            part = f"[{key}]" if isinstance(key, int) else (f".{key}" if prefix else str(key))
            yield from all_errors(messages[key], prefix + part)
    elif isinstance(messages, list):
        # One message per field: marshmallow lists a field's failed validators, the first says enough.
        yield from all_errors(messages[0], prefix)
    else:
        yield prefix or "configuration", str(messages)


class PlainMessages:
    """Short lower-case messages, so a config error reads as one line."""

    default_error_messages = {
        "required": "missing",
        "null": "may not be null",
        "validator_failed": "invalid value",
    }


class Str(PlainMessages, fields.String):
    default_error_messages = {"invalid": "not a string"}


class Bool(PlainMessages, fields.Boolean):
    """A JSON boolean only: "yes" or 1 are mistakes in a security setting."""

    default_error_messages = {"invalid": "not a boolean (true or false)"}

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class Seconds(PlainMessages, fields.Float):
    """A positive number of seconds (integer or decimal)."""

    default_error_messages = {"invalid": "not a number of seconds"}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400 * 365:
            raise self.make_error("invalid")
        return float(value)


class Int(PlainMessages, fields.Integer):
    """A JSON integer only: booleans, floats and numeric strings are refused."""

    default_error_messages = {"invalid": "not an integer"}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return value


class List(PlainMessages, fields.List):
    default_error_messages = {"invalid": "not a list"}


class Nested(PlainMessages, fields.Nested):
    default_error_messages = {"type": "not an object"}


_BYTE = validate.Range(0, 255, error="not a byte (0 to 255)")


class IdField(PlainMessages, fields.Field):
    """An SAE or KME ID (kme.ids): a JSON integer or a string of the allowed form, kept as given."""

    default_error_messages = {"invalid": f"not an ID ({ids.RULE})"}
    # What OpenAPI documents of the messages that carry IDs say of them.
    SCHEMA = {"oneOf": [{"type": "integer", "minimum": 0, "maximum": ids.ID_MAX},
                        {"type": "string", "pattern": f"^{ids.PATTERN}$"}]}

    def __init__(self, **kwargs):
        super().__init__(metadata=IdField.SCHEMA, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if not ids.is_id(value):
            raise self.make_error("invalid")
        return value


def _address(value):
    match = _ADDRESS.match(value)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValidationError("not an address of the form host:port")


def _serial_bytes(value):
    if not value:
        raise ValidationError("empty serial number")


class StrictSchema(Schema):
    """Unknown keys are errors: a misspelt optional field must not pass silently."""

    error_messages = {"unknown": "unknown field", "type": "not an object"}


class HttpsInterfaceSchema(StrictSchema):
    listen_address = Str(required=True, validate=_address)
    ca_client_cert_path = Str(required=True)
    several_client_cas = Bool()
    server_cert_path = Str(required=True)
    server_key_path = Str(required=True)


class LimitsSchema(StrictSchema):
    key_size = Int(validate=validate.Range(8, 2**20))
    min_key_size = Int(validate=validate.Range(8, 2**20))
    max_key_size = Int(validate=validate.Range(8, 2**20))
    max_key_per_request = Int(validate=validate.Range(1, 10_000))
    max_key_count = Int(validate=validate.Range(1, ids.ID_MAX))
    max_SAE_ID_count = Int(validate=validate.Range(0, 64))


class ThisKmeSchema(StrictSchema):
    id = IdField(required=True)
    nickname = Str(validate=validate.Length(1, 64))
    sqlite_db_path = Str(validate=validate.Length(min=1))
    db_uri = Str(validate=validate.Length(min=1))
    key_encryption_key = Str(validate=validate.Length(min=1))
    key_directory_to_watch = Str(required=True)
    saes_https_interface = Nested(HttpsInterfaceSchema, required=True)
    debugging_http_interface = Str(validate=_address)
    kmes_https_interface = Nested(HttpsInterfaceSchema)
    skip_https_interface = Nested(HttpsInterfaceSchema)
    etsi004_interface = Nested(HttpsInterfaceSchema)
    interop_https_interface = Nested(HttpsInterfaceSchema)
    delete_key_file_after_read = Bool()
    debugging_http_allow_non_loopback = Bool()
    interop_https_allow_any_network = Bool()
    metrics_directory = Str(validate=validate.Length(min=1))
    log_level = Str(validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR"], error="one of DEBUG, INFO, WARNING, ERROR"))
    log_format = Str(validate=validate.OneOf(["text", "json"], error="text or json"))
    key_expiry_seconds = Seconds()
    housekeeping_interval_seconds = Seconds()
    rescan_interval_seconds = Seconds()
    key_file_settle_seconds = Seconds()
    unmatched_key_grace_seconds = Seconds()
    limits = Nested(LimitsSchema)


class OtherKmeSchema(StrictSchema):
    id = IdField(required=True)
    key_directory_to_watch = Str(required=True)
    inter_kme_bind_address = Str(required=True, validate=_address)
    ignore_system_proxy_settings = Bool()
    https_client_authentication_certificate = Str(required=True)
    https_client_authentication_certificate_password = Str(required=True)
    server_ca_cert_path = Str()
    https_client_certificate_serial = List(Int(validate=_BYTE), validate=_serial_bytes)
    connect_timeout_seconds = Seconds()
    read_timeout_seconds = Seconds()


class SaeSchema(StrictSchema):
    id = IdField(required=True)
    kme_id = IdField(required=True)
    https_client_certificate_serial = List(Int(validate=_BYTE), validate=_serial_bytes)


class RouteSchema(StrictSchema):
    kme_id = IdField(required=True)
    via = IdField(required=True)


def _https_url(value):
    if not re.fullmatch(r"https://[^\s/?#]+(/[^\s?#]*)?", value):
        raise ValidationError("not an https:// URL without query or fragment")


class ForeignKmsSchema(StrictSchema):
    id = IdField(required=True)
    https_client_certificate_serial = List(Int(validate=_BYTE), required=True, validate=_serial_bytes)
    base_url = Str(required=True, validate=_https_url)
    https_client_authentication_certificate = Str(required=True)
    https_client_authentication_certificate_password = Str(required=True)
    server_ca_cert_path = Str(required=True)
    connect_timeout_seconds = Seconds()
    read_timeout_seconds = Seconds()
    target_sae_ids = List(IdField(), load_default=list)
    ack_callback_url = Str(validate=_https_url)
    ack_attempts = Int(load_default=10, validate=validate.Range(1, 1000, error="between 1 and 1000"))


class ConfigSchema(StrictSchema):
    this_kme = Nested(ThisKmeSchema, required=True)
    other_kmes = List(Nested(OtherKmeSchema), load_default=list)
    saes = List(Nested(SaeSchema), required=True)
    routes = List(Nested(RouteSchema), load_default=list)
    foreign_kms = List(Nested(ForeignKmsSchema), load_default=list)
