"""The messages of the inter-KME interface as marshmallow schemas (docs/inter-kme-protocol.md).

Both ends use them: the interface loads requests with them, the peer client
loads answers with them, and the OpenAPI document is built from them.
"""
from marshmallow import ValidationError, validate, validates_schema

from kme.config_schema import Bool, IdField, Int, List, Nested, Str, StrictSchema
from kme.key_ids import KeyIdField
from kme.storage.keystore.leases import APPLIED, MAX_LEASE, PENDING, UNKNOWN
from kme.storage.keystore.progress import PAGE as PROGRESS_PAGE

_POSITION = validate.Range(0, 2**62)
# A change number or cursor of the progress exchange: an integer any JSON parser keeps exact.
_CHANGE = validate.Range(0, 2**53 - 1)
# A key file's name as the file system has it: never a NUL (PostgreSQL's text refuses it) nor a slash.
_FILE = [validate.Length(1, 255), validate.Regexp(r"^[^\x00/]+$", error="not a file name")]
_DATABASE_ID = validate.Regexp("^[0-9a-f]{32}$", error="32 lowercase hexadecimal digits")


class PartSchema(StrictSchema):
    file = Str(required=True, validate=_FILE)
    position = Int(required=True, validate=_POSITION)


class WireKeySchema(StrictSchema):
    key_ID = KeyIdField(required=True)
    parts = List(Nested(PartSchema), required=True, validate=validate.Length(min=1))


# An ETSI GS QKD 004 stream's index, chunk size (bytes) and TTL (s): unsigned 32-bit numbers on that wire.
_UINT32 = validate.Range(0, 2**32 - 1)


class StreamChunkRefSchema(StrictSchema):
    """The chunk of an ETSI GS QKD 004 stream that an activation's one key is (docs/etsi004.md)."""

    KSID = KeyIdField(required=True)
    index = Int(required=True, validate=_UINT32)
    chunk_size = Int(required=True, validate=validate.Range(1, 2**32 - 1))
    ttl = Int(required=True, validate=_UINT32)


class ActivationSchema(StrictSchema):
    activation_ID = KeyIdField(required=True)
    master_SAE_ID = IdField(required=True)
    slave_SAE_IDs = List(IdField(), required=True, validate=validate.Length(min=1))
    size = Int(required=True)
    keys = List(Nested(WireKeySchema), required=True, validate=validate.Length(min=1))
    stream = Nested(StreamChunkRefSchema)


class ActivatedSchema(StrictSchema):
    """The answer to an activation."""

    activation_ID = KeyIdField(required=True)
    activated = Int(required=True)


class CancelledSchema(StrictSchema):
    """The answer to a cancel."""

    activation_ID = KeyIdField(required=True)
    state = Str(required=True, validate=validate.OneOf(["cancelled"]))


class LeaseSchema(StrictSchema):
    """A lease asked: at least ``minimum`` keys or none, ``wanted`` if the lender can spare them."""

    lease_ID = KeyIdField(required=True)
    # A borrower asks what it misses for one request at least, and never more than the largest lease.
    minimum = Int(required=True, validate=validate.Range(0, MAX_LEASE))
    wanted = Int(required=True, validate=validate.Range(0, MAX_LEASE))


class RunSchema(StrictSchema):
    """Consecutive positions of one file."""

    file = Str(required=True, validate=_FILE)
    first = Int(required=True, validate=_POSITION)
    count = Int(required=True, validate=validate.Range(1, 2**31))


class LeaseAnswerSchema(StrictSchema):
    """The keys lent (none if fewer than the minimum were free) and the lender's free keys left."""

    lease_ID = KeyIdField(required=True)
    runs = List(Nested(RunSchema), required=True)
    free = Int(required=True, validate=_POSITION)


class LeaseStatesSchema(StrictSchema):
    """Leases the caller gave this KME and wants to know the fate of."""

    lease_IDs = List(KeyIdField(), required=True, validate=validate.Length(1, PROGRESS_PAGE))


class LeaseStateSchema(StrictSchema):
    lease_ID = KeyIdField(required=True)
    state = Str(required=True, validate=validate.OneOf([APPLIED, PENDING, UNKNOWN]))


class LeaseStatesAnswerSchema(StrictSchema):
    """What the borrower did with each lease: applied it, still asks for it, or never recorded it."""

    database_ID = Str(required=True, validate=_DATABASE_ID)
    leases = List(Nested(LeaseStateSchema), required=True, validate=validate.Length(max=PROGRESS_PAGE))


class FileOfferSchema(StrictSchema):
    """How many leading positions of a file the sender holds, and its change number."""

    file = Str(required=True, validate=_FILE)
    offered = Int(required=True, validate=_POSITION)
    seq = Int(required=True, validate=_CHANGE)


class _ProgressMessage(StrictSchema):
    """What both messages of the progress exchange carry: the sender's database, free keys, changed files, and its
    last change number ``head`` (optional: a KME of an earlier release does not send it), which no file's change
    number exceeds."""

    database_ID = Str(required=True, validate=_DATABASE_ID)
    free = Int(required=True, validate=_POSITION)
    files = List(Nested(FileOfferSchema), required=True, validate=validate.Length(max=PROGRESS_PAGE))
    head = Int(load_default=None, validate=_CHANGE)

    @validates_schema
    def _files_up_to_head(self, data, **_kwargs):
        if data.get("head") is not None and any(item["seq"] > data["head"] for item in data.get("files", [])):
            raise ValidationError("a file's seq is past the sender's last change (head)", "files")


class ProgressSchema(_ProgressMessage):
    """The caller's ingestion progress and cursors."""

    known_database_ID = Str(required=True, allow_none=True, validate=_DATABASE_ID)
    since = Int(required=True, validate=_CHANGE)
    after = Int(required=True, validate=_CHANGE)


class ProgressAnswerSchema(_ProgressMessage):
    """The callee's ingestion progress since the caller's cursor, and how far it has the caller's."""

    seen = Int(required=True, validate=_CHANGE)


# The header carrying the one-time MAC of a relay message's body (base64).
RELAY_MAC_HEADER = "KME-Relay-MAC"
# A trusted node passes a relay on at most this many times (the path's length): a loop the routes missed ends.
MAX_HOPS = 16


class TargetSchema(StrictSchema):
    """A destination KME of a relay and its slave SAEs there."""

    kme_ID = IdField(required=True)
    slave_SAE_IDs = List(IdField(), required=True, validate=validate.Length(min=1))


class RelayedKeySchema(StrictSchema):
    """A relayed key on one hop: its parts on the hop's link, and the key sealed with them (absent on the first
    hop, where the key is those parts' material)."""

    key_ID = KeyIdField(required=True)
    parts = List(Nested(PartSchema), required=True, validate=validate.Length(min=1))
    sealed = Str(validate=[validate.Length(max=4096),
                           validate.Regexp(r"^[A-Za-z0-9+/]*={0,2}$", error="not base64")])


class RelaySchema(StrictSchema):
    """A relay message from one KME to its neighbour (the one-time MAC of the body travels in a header)."""

    activation_ID = KeyIdField(required=True)
    relay_ID = KeyIdField(required=True)
    path = List(IdField(), required=True, validate=validate.Length(1, MAX_HOPS))
    master_SAE_ID = IdField(required=True)
    size = Int(required=True)
    hold = Bool(required=True)
    timeout_ms = Int(required=True, validate=validate.Range(1, 600_000))
    targets = List(Nested(TargetSchema), required=True, validate=validate.Length(min=1))
    keys = List(Nested(RelayedKeySchema), required=True, validate=validate.Length(min=1))
    mac_part = Nested(PartSchema, required=True)


class RelayCancelSchema(StrictSchema):
    """Cancel or release of a relay on one hop: its activation and every part of the hop's link it named."""

    activation_ID = KeyIdField(required=True)
    parts = List(Nested(PartSchema), required=True, validate=validate.Length(min=1))


class ReleasedSchema(StrictSchema):
    """The answer to a release."""

    activation_ID = KeyIdField(required=True)
    state = Str(required=True, validate=validate.OneOf(["released"]))


class StreamOpenSchema(StrictSchema):
    """The slave SAE of an ETSI GS QKD 004 stream opened its end at the caller: asked of the master's KME."""

    KSID = KeyIdField(required=True)
    master_SAE_ID = IdField(required=True)
    slave_SAE_ID = IdField(required=True)
    chunk_size = Int(required=True, validate=validate.Range(1, 2**32 - 1))
    ttl = Int(required=True, validate=_UINT32)


class StreamOpenAnswerSchema(StrictSchema):
    """The stream as the master's KME has it: the 004 status of the slave's end (0 open, 1 waiting for its master,
    5 KSID in use) and the chunk size and TTL of the stream."""

    KSID = KeyIdField(required=True)
    status = Int(required=True, validate=validate.OneOf([0, 1, 5]))
    chunk_size = Int(required=True, validate=validate.Range(1, 2**32 - 1))
    ttl = Int(required=True, validate=_UINT32)


class StreamChunkSchema(StrictSchema):
    """The slave SAE asks the caller for a chunk its KME has not got: asked of the master's KME, which makes it and
    activates it at the caller before it answers."""

    KSID = KeyIdField(required=True)
    index = Int(required=True, validate=_UINT32)


class StreamChunkAnswerSchema(StrictSchema):
    """0: the chunk is activated at the caller; 2: it cannot be made (not enough keys); 3: the master has not
    opened the stream, or it is closed."""

    KSID = KeyIdField(required=True)
    index = Int(required=True, validate=_UINT32)
    status = Int(required=True, validate=validate.OneOf([0, 2, 3]))


class StreamCloseSchema(StrictSchema):
    """An end of the stream closed it at the caller: the other KME closes it too."""

    KSID = KeyIdField(required=True)


class StreamClosedSchema(StrictSchema):
    """The answer to a close (idempotent)."""

    KSID = KeyIdField(required=True)
    state = Str(required=True, validate=validate.OneOf(["closed"]))
