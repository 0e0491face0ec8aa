"""ETSI GS QKD 004 key streams, as plain functions (docs/etsi004.md): OPEN_CONNECT, GET_KEY and CLOSE of an SAE of
this KME, answered with the standard's statuses.

Both ends of a stream open it with one KSID and read its chunks by index;
the chunk at an index is the same at both ends and given once to each. This
KME serves streams between two of its own SAEs (its zone); a stream whose
other end is an SAE of another KME is answered "no QKD connection" (status
4) for now.
"""
import uuid
from dataclasses import dataclass, replace

from kme import ids
from kme.config import KmeConfig, Sae
from kme.errors import NotEnoughKeys
from kme.storage.keystore import streams as store

# Statuses (ETSI GS QKD 004 V2.1.1, clause 6).
SUCCESS = 0
PEER_NOT_CONNECTED = 1
INSUFFICIENT_KEY = 2
GET_KEY_PEER_NOT_CONNECTED = 3
NO_QKD_CONNECTION = 4
KSID_IN_USE = 5
QOS_NOT_MET = 7
METADATA_TOO_SMALL = 8
# What a stream's chunk answers carry as metadata (the mimetype the client asked for is kept in the QoS).
METADATA = b""


@dataclass(frozen=True)
class Qos:
    """Quality of service: Key_chunk_size in bytes, rates in bit/s, Timeout in ms, TTL in s, the metadata's type."""

    key_chunk_size: int
    max_bps: int
    min_bps: int
    jitter: int
    priority: int
    timeout: int
    ttl: int
    metadata_mimetype: str


def open_connect(config: KmeConfig, caller: Sae, source: str, destination: str, qos: Qos,
                 ksid: uuid.UUID | None) -> tuple[int, Qos, uuid.UUID | None]:
    """OPEN_CONNECT: (status, the QoS granted, the KSID). The caller is the source (the master) or the destination
    (the slave) of the stream; a master without a KSID gets a new one."""
    master, slave = sae_of(config, source), sae_of(config, destination)
    if master is None or slave is None or master.id == slave.id or caller.id not in (master.id, slave.id):
        return NO_QKD_CONNECTION, qos, ksid
    if master.kme_id != config.this_kme.id or slave.kme_id != config.this_kme.id:
        return NO_QKD_CONNECTION, qos, ksid
    is_master = caller.id == master.id
    if ksid is None:
        if not is_master:
            return NO_QKD_CONNECTION, qos, None
        ksid = uuid.uuid4()
    limits = config.this_kme.limits
    # 0 asks for nothing in particular: the KME's key size, and its expiry of waiting keys.
    chunk_size = min(max(qos.key_chunk_size or limits.key_size // 8, 1), limits.max_key_size // 8)
    ttl = qos.ttl or int(config.this_kme.key_expiry_seconds)
    stream, became = store.open_end(str(ksid), config.this_kme.id, master.id, slave.id, chunk_size, ttl, is_master)
    if became is None:
        return KSID_IN_USE, qos, ksid
    agreed = replace(qos, key_chunk_size=stream.chunk_size, ttl=stream.ttl_seconds if qos.ttl else 0)
    if agreed != qos:
        # The stream is open all the same, with the QoS it has: the clients take 7 with a KSID as success.
        return QOS_NOT_MET, agreed, ksid
    return (SUCCESS if became == store.OPEN else PEER_NOT_CONNECTED), agreed, ksid


def get_key(config: KmeConfig, caller: Sae, ksid: uuid.UUID, index: int,
            metadata_size: int) -> tuple[int, int, bytes, bytes]:
    """GET_KEY: (status, index, chunk, metadata) for the caller, an end of the stream."""
    stream = store.find(str(ksid))
    if stream is None or ids.number(caller.id) not in (stream.master_sae_id, stream.slave_sae_id):
        return NO_QKD_CONNECTION, index, b"", b""
    is_master = ids.number(caller.id) == stream.master_sae_id
    if stream.closed or (stream.master_end if is_master else stream.slave_end) == store.ABSENT \
            or stream.master_end != store.OPEN:
        return GET_KEY_PEER_NOT_CONNECTED, index, b"", b""
    if metadata_size < len(METADATA):
        return METADATA_TOO_SMALL, index, b"", b""
    try:
        chunk = store.read_chunk(stream, index, caller.id)
    except NotEnoughKeys:
        return INSUFFICIENT_KEY, index, b"", b""
    if chunk is None:
        return INSUFFICIENT_KEY, index, b"", b""
    return SUCCESS, index, chunk, METADATA


def close(config: KmeConfig, caller: Sae, ksid: uuid.UUID) -> int:
    """CLOSE: the stream ends for both ends; what neither read is erased."""
    stream = store.find(str(ksid))
    if stream is None or ids.number(caller.id) not in (stream.master_sae_id, stream.slave_sae_id):
        return NO_QKD_CONNECTION
    if not stream.closed:
        store.close(stream, caller.id)
    return SUCCESS


def sae_of(config: KmeConfig, uri: str) -> Sae | None:
    """The SAE a URI names: ``qkd://<SAE_ID>@<KME>``, ``<scheme>://<SAE_ID>``, or the SAE ID alone (the forms the
    reference clients send)."""
    name = uri.split("://", 1)[1] if "://" in uri else uri
    sae_id = ids.from_text(name.split("@", 1)[0].split("/", 1)[0])
    return None if sae_id is None else config.saes_by_id.get(sae_id)
