"""The ETSI GS QKD 004 wire format of the ETSI reference implementation and the clients built on it
(docs/etsi004.md): an 8-byte header (version 1.0.1, a service type, the payload's length) and binary payloads.

Pure functions of bytes: the server (kme.interfaces.etsi004_server) reads
requests and writes answers with them. Every number is big-endian; a
malformed frame raises WireError and the server closes the connection.
"""
import struct
import uuid
from dataclasses import dataclass

from kme.domain.streams import Qos

# The versions the clients write: 1.0.1 (the reference implementation, QUBIP's client), 2.1.1 (the library that
# wg-qrotator bundles: the standard's own version). An answer carries the version of its request.
VERSIONS = ((1, 0, 1), (2, 1, 1))
HEADER = struct.Struct("!BBBBI")
OPEN_CONNECT_REQUEST, OPEN_CONNECT_RESPONSE = 0x02, 0x03
GET_KEY_REQUEST, GET_KEY_RESPONSE = 0x04, 0x05
CLOSE_REQUEST, CLOSE_RESPONSE = 0x08, 0x09
REQUESTS = (OPEN_CONNECT_REQUEST, GET_KEY_REQUEST, CLOSE_REQUEST)
# The largest request payload the server reads: two URIs, the QoS and a KSID fit many times over.
MAX_PAYLOAD = 4096
MIMETYPE_BYTES = 256
_QOS = struct.Struct("!7I")
_U32 = struct.Struct("!I")
KSID_BYTES = 16

class WireError(ValueError):
    """A frame that does not follow the format; str() says how (for the log, never for the client)."""


@dataclass(frozen=True)
class OpenConnect:
    source: str
    destination: str
    qos: Qos
    ksid: uuid.UUID | None


@dataclass(frozen=True)
class GetKey:
    ksid: uuid.UUID
    index: int
    metadata_size: int


@dataclass(frozen=True)
class Close:
    ksid: uuid.UUID


def frame(version: bytes, service: int, payload: bytes) -> bytes:
    """A whole frame: the header (``version``: its 3 bytes), then the payload."""
    return HEADER.pack(*version, service, len(payload)) + payload


def pack_qos(version: bytes, qos: Qos) -> bytes:
    """The QoS as the wire has it: seven unsigned 32-bit numbers, then the mimetype: in 256 NUL-padded bytes in
    version 1.0.1, NUL-terminated in 2.1.1."""
    mimetype = qos.metadata_mimetype.encode()[:MIMETYPE_BYTES - 1]
    numbers = _QOS.pack(qos.key_chunk_size, qos.max_bps, qos.min_bps, qos.jitter, qos.priority, qos.timeout, qos.ttl)
    return numbers + (mimetype.ljust(MIMETYPE_BYTES, b"\0") if version == bytes(VERSIONS[0]) else mimetype + b"\0")


def unpack_qos(data: bytes) -> Qos:
    """The QoS of its wire form (either form of the mimetype: NUL-terminated, at most 256 bytes with its NUL);
    WireError if malformed."""
    mimetype = data[_QOS.size:]
    if not 1 <= len(mimetype) <= MIMETYPE_BYTES or b"\0" not in mimetype:
        raise WireError("QoS: the metadata mimetype is not NUL-terminated within 256 bytes")
    try:
        text = mimetype.split(b"\0", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        raise WireError("QoS: the metadata mimetype is not ASCII") from None
    return Qos(*_QOS.unpack(data[:_QOS.size]), text)


def parse_header(header: bytes) -> tuple[bytes, int, int]:
    """(version bytes, service type, payload length) of an 8-byte header; WireError for another version, a service
    that is no request, or a payload beyond MAX_PAYLOAD."""
    major, minor, patch, service, length = HEADER.unpack(header)
    if (major, minor, patch) not in VERSIONS:
        raise WireError(f"version {major}.{minor}.{patch}, neither 1.0.1 nor 2.1.1")
    if service not in REQUESTS:
        raise WireError(f"service type {service:#04x} is no request")
    if length > MAX_PAYLOAD:
        raise WireError(f"a payload of {length} bytes, more than {MAX_PAYLOAD}")
    return header[:3], service, length


def parse_request(service: int, payload: bytes) -> OpenConnect | GetKey | Close:
    """The request a payload carries; WireError if it is malformed."""
    if service == OPEN_CONNECT_REQUEST:
        return _open_connect(payload)
    if service == GET_KEY_REQUEST:
        fixed = KSID_BYTES + 2 * _U32.size
        if len(payload) < fixed:
            raise WireError("GET_KEY: too short")
        index, metadata_size = struct.unpack("!II", payload[KSID_BYTES:fixed])
        # 1.0.1 sends the size of the client's metadata buffer alone; 2.1.1 the buffer too (its size, its bytes).
        if len(payload) not in (fixed, fixed + metadata_size):
            raise WireError("GET_KEY: wrong length")
        return GetKey(uuid.UUID(bytes=payload[:KSID_BYTES]), index, metadata_size)
    if len(payload) != KSID_BYTES:
        raise WireError("CLOSE: wrong length")
    return Close(uuid.UUID(bytes=payload))


def _open_connect(payload: bytes) -> OpenConnect:
    parts = payload.split(b"\0", 2)
    if len(parts) != 3:
        raise WireError("OPEN_CONNECT: the URIs are not NUL-terminated")
    source, destination, rest = parts
    if len(rest) < _QOS.size + 1 + KSID_BYTES:
        raise WireError("OPEN_CONNECT: too short")
    try:
        uris = source.decode("utf-8"), destination.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("OPEN_CONNECT: a URI is not UTF-8") from None
    ksid = uuid.UUID(bytes=rest[-KSID_BYTES:])
    return OpenConnect(*uris, unpack_qos(rest[:-KSID_BYTES]), None if ksid.int == 0 else ksid)


def open_connect_response(version: bytes, status: int, qos: Qos, ksid: uuid.UUID | None) -> bytes:
    """The frame of an OPEN_CONNECT answer: status, the QoS granted, the KSID (zeros when none)."""
    return frame(version, OPEN_CONNECT_RESPONSE,
                 _U32.pack(status) + pack_qos(version, qos) + (ksid.bytes if ksid else bytes(KSID_BYTES)))


def get_key_response(version: bytes, status: int, index: int, chunk: bytes, metadata: bytes) -> bytes:
    """The frame of a GET_KEY answer: status, index, the chunk's length and bytes, the metadata's length and bytes."""
    return frame(version, GET_KEY_RESPONSE,
                 struct.pack("!III", status, index, len(chunk)) + chunk + _U32.pack(len(metadata)) + metadata)


def close_response(version: bytes, status: int) -> bytes:
    """The frame of a CLOSE answer: its status."""
    return frame(version, CLOSE_RESPONSE, _U32.pack(status))
