"""ETSI GS QKD 004 key streams, as plain functions (docs/etsi004.md): OPEN_CONNECT, GET_KEY and CLOSE of an SAE of
this KME, answered with the standard's statuses, and what a linked KME asks about the streams between its SAEs
and ours.

Both ends of a stream open it with one KSID and read its chunks by index;
the chunk at an index is the same at both ends and given once to each. In
the zone (two SAEs of this KME) the first read of an index makes its chunk.
Across a link, the master's KME owns the stream: it makes every chunk from
its direction of the link and activates it at the slave's KME by our
inter-KME activation, with the KSID and the index, before either end gets
it; the slave's KME tells it when the slave opens, asks it for a chunk it
has not got, and each KME tells the other when an end closes.
"""
import logging
import time
import uuid
from dataclasses import dataclass, replace

from kme import ids
from kme.config import KmeConfig, OtherKme, Sae
from kme.domain import activation, relay
from kme.errors import Forbidden, NotEnoughKeys, PeerError, PeerFailure, PeerRefused
from kme.peers.client import client_for
from kme.storage.keystore import streams as store
from kme.storage.keystore.incoming import ActivationRequest

log = logging.getLogger(__name__)

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
# How often a reader looks whether a chunk that another call is making is made.
_MAKING_POLL_SECONDS = 0.05


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
    (the slave) of the stream; a master without a KSID gets a new one. The other end is an SAE of this KME or of a
    linked KME."""
    master, slave = sae_of(config, source), sae_of(config, destination)
    if master is None or slave is None or master.id == slave.id or caller.id not in (master.id, slave.id):
        return NO_QKD_CONNECTION, qos, ksid
    is_master = caller.id == master.id
    other = slave if is_master else master
    peer = None if other.kme_id == config.this_kme.id else config.other_kmes_by_id.get(other.kme_id)
    if peer is None and other.kme_id != config.this_kme.id:
        return NO_QKD_CONNECTION, qos, ksid
    if ksid is None:
        if not is_master:
            return NO_QKD_CONNECTION, qos, None
        ksid = uuid.uuid4()
    limits = config.this_kme.limits
    # 0 asks for nothing in particular: the KME's key size, and its expiry of waiting keys.
    chunk_size = min(max(qos.key_chunk_size or limits.key_size // 8, 1), limits.max_key_size // 8)
    ttl = qos.ttl or int(config.this_kme.key_expiry_seconds)
    master_open = False
    if peer is not None and not is_master:
        # The master's KME owns the stream: it learns that the slave opened, and says what the stream is.
        try:
            answer = client_for(peer).stream_open({"KSID": str(ksid), "master_SAE_ID": master.id,
                                                   "slave_SAE_ID": slave.id, "chunk_size": chunk_size, "ttl": ttl},
                                                  time.monotonic() + relay.peer_wait([peer]))
        except PeerError as exc:
            log.warning("key stream %s: the slave's end could not be opened at KME %s: %s", ksid, peer.id, exc)
            return NO_QKD_CONNECTION, qos, ksid
        if answer["status"] == KSID_IN_USE:
            return KSID_IN_USE, qos, ksid
        chunk_size, ttl, master_open = answer["chunk_size"], answer["ttl"], answer["status"] == SUCCESS
    link_id = config.this_kme.id if peer is None else peer.id
    stream, became = store.open_end(str(ksid), link_id, master.id, slave.id, chunk_size, ttl, is_master, master_open)
    if became is None:
        return KSID_IN_USE, qos, ksid
    # What the link can give is the rate its keys arrive at: a Min_bps above it is granted only that rate.
    agreed = replace(qos, key_chunk_size=stream.chunk_size, ttl=stream.ttl_seconds if qos.ttl else 0,
                     min_bps=min(qos.min_bps, store.link_rate_bps(link_id)))
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
    if stream.closed or (stream.master_end if is_master else stream.slave_end) == store.ABSENT:
        return GET_KEY_PEER_NOT_CONNECTED, index, b"", b""
    if metadata_size < len(METADATA):
        return METADATA_TOO_SMALL, index, b"", b""
    in_zone = stream.link_id == ids.number(config.this_kme.id)
    if in_zone and stream.master_end != store.OPEN:
        return GET_KEY_PEER_NOT_CONNECTED, index, b"", b""
    if not in_zone:
        status = (_make(config, stream, index) if is_master else _ask_for_chunk(config, stream, index))
        if status != SUCCESS:
            return status, index, b"", b""
    try:
        chunk = store.read_chunk(stream, index, caller.id, make=in_zone)
    except NotEnoughKeys:
        return INSUFFICIENT_KEY, index, b"", b""
    if chunk is None:
        return INSUFFICIENT_KEY, index, b"", b""
    return SUCCESS, index, chunk, METADATA


def _make(config: KmeConfig, stream: store.Stream, index: int) -> int:
    """At the master's KME: the chunk at ``index`` made and activated at the slave's KME (now, or by another call
    before): SUCCESS, or the status that says why not."""
    peer = _peer(config, stream)
    if peer is None:
        return NO_QKD_CONNECTION
    state = store.claim_chunk(stream, index)
    if state == store.MAKING:
        return _wait_made(stream, index, time.monotonic() + relay.peer_wait([peer]))
    if state == store.MADE:
        return SUCCESS
    master, slave = (config.saes_by_id[config.sae_id(number)] for number in (stream.master_sae_id,
                                                                             stream.slave_sae_id))
    chunk = {"KSID": stream.ksid, "index": index, "chunk_size": stream.chunk_size, "ttl": stream.ttl_seconds}
    try:
        # The master is the one "local slave": its copy waits here until it reads it.
        activation.activate_at_peer(config, peer, master, [slave], [master], 1, stream.chunk_size * 8,
                                    [store.chunk_key_id(stream.ksid, index)], chunk)
    except NotEnoughKeys:
        store.drop_claim(stream.ksid, index)
        return INSUFFICIENT_KEY
    except PeerFailure as exc:
        # Keys held back are cancelled at both ends, never used: their index is never made again.
        if not activation.keys_held_back(exc):
            store.drop_claim(stream.ksid, index)
        log.warning("key stream %s: chunk %s not activated at KME %s: %s", stream.ksid, index, peer.id, exc)
        return NO_QKD_CONNECTION
    store.mark_made(stream.ksid, index)
    return SUCCESS


def _wait_made(stream: store.Stream, index: int, deadline: float) -> int:
    """Another call is making the chunk: SUCCESS once it is made, INSUFFICIENT_KEY if it was not by ``deadline``."""
    while time.monotonic() < deadline:
        state = store.chunk_state(stream.ksid, index)
        if state == store.MADE:
            return SUCCESS
        if state is None:
            return INSUFFICIENT_KEY
        time.sleep(_MAKING_POLL_SECONDS)
    return INSUFFICIENT_KEY


def _ask_for_chunk(config: KmeConfig, stream: store.Stream, index: int) -> int:
    """At the slave's KME: SUCCESS if the chunk at ``index`` was activated here (before, or by the master's KME now,
    asked for it), or the status that says why not."""
    if store.chunk_state(stream.ksid, index) is not None:
        return SUCCESS
    peer = _peer(config, stream)
    if peer is None:
        return NO_QKD_CONNECTION
    try:
        answer = client_for(peer).stream_chunk({"KSID": stream.ksid, "index": index},
                                               time.monotonic() + relay.peer_wait([peer]))
    except PeerError as exc:
        log.warning("key stream %s: chunk %s not obtained from KME %s: %s", stream.ksid, index, peer.id, exc)
        return NO_QKD_CONNECTION
    return answer["status"]


def _peer(config: KmeConfig, stream: store.Stream) -> OtherKme | None:
    return config.other_kmes_by_id.get(config.kme_id(stream.link_id))


def close(config: KmeConfig, caller: Sae, ksid: uuid.UUID) -> int:
    """CLOSE: the stream ends for both ends; what neither read is erased (at the other end's KME too, which is
    told now, or by the background worker once it can be: tell_closes)."""
    stream = store.find(str(ksid))
    if stream is None or ids.number(caller.id) not in (stream.master_sae_id, stream.slave_sae_id):
        return NO_QKD_CONNECTION
    if stream.closed:
        return SUCCESS
    peer = _peer(config, stream)
    store.close(stream, f"SAE {caller.id}", tell_peer=peer is not None)
    if peer is not None:
        _tell_close(peer, stream)
    return SUCCESS


def tell_closes(config: KmeConfig) -> None:
    """Tell the other KME of each stream closed here that it has not heard of (the background worker, every
    housekeeping interval): it erases its copies of the chunks then."""
    for stream in store.closes_untold():
        peer = _peer(config, stream)
        if peer is None:
            # The link left the configuration: nobody is left to tell.
            store.close_told(stream.ksid)
        else:
            _tell_close(peer, stream)


def _tell_close(peer: OtherKme, stream: store.Stream) -> None:
    """Tell ``peer`` that ``stream`` closed; remembered as told once it answered (a refusal is an answer: it has
    nothing of the stream to close)."""
    try:
        client_for(peer).stream_close({"KSID": stream.ksid}, time.monotonic() + relay.peer_wait([peer]))
    except PeerRefused as exc:
        log.warning("key stream %s: KME %s refused its close: %s", stream.ksid, peer.id, exc.detail)
    except PeerError as exc:
        log.info("key stream %s: KME %s not told of its close yet: %s", stream.ksid, peer.id, exc)
        return
    store.close_told(stream.ksid)


def accept_slave_open(config: KmeConfig, caller: OtherKme, data: dict) -> tuple[int, int, int]:
    """At the master's KME: the slave SAE opened its end at ``caller``, its KME: (status of that end, chunk size,
    TTL) of the stream, made here if the master has not opened it yet."""
    master, slave = config.saes_by_id.get(data["master_SAE_ID"]), config.saes_by_id.get(data["slave_SAE_ID"])
    if master is None or master.kme_id != config.this_kme.id:
        raise Forbidden(f"SAE {data['master_SAE_ID']} is not an SAE of this KME")
    if slave is None or slave.kme_id != caller.id:
        raise Forbidden(f"SAE {data['slave_SAE_ID']} is not an SAE of KME {caller.id}")
    stream, became = store.open_end(data["KSID"], caller.id, master.id, slave.id, data["chunk_size"], data["ttl"],
                                    False)
    status = KSID_IN_USE if became is None else SUCCESS if became == store.OPEN else PEER_NOT_CONNECTED
    return status, stream.chunk_size, stream.ttl_seconds


def accept_chunk_request(config: KmeConfig, caller: OtherKme, ksid: str, index: int) -> int:
    """At the master's KME: the slave asked ``caller``, its KME, for the chunk at ``index``: the status, SUCCESS
    once the chunk is activated there."""
    stream = _caller_stream(config, caller, ksid)
    if stream is None or stream.closed or stream.master_end != store.OPEN:
        return GET_KEY_PEER_NOT_CONNECTED
    master = config.saes_by_id.get(config.sae_id(stream.master_sae_id))
    if master is None or master.kme_id != config.this_kme.id:
        raise Forbidden(f"key stream {ksid}: its master is not an SAE of this KME")
    return _make(config, stream, index)


def accept_chunk(config: KmeConfig, caller: OtherKme, request: ActivationRequest) -> int:
    """At the slave's KME: the activation of a chunk of a stream whose master is the caller's SAE, recorded as the
    chunk at its index (Forbidden if the KSID is a stream of another pair or closed)."""
    chunk = request.stream
    if len(request.keys) != 1 or len(request.slave_ids) != 1:
        raise Forbidden("a chunk of a key stream is one key for one slave SAE")
    known = store.find(chunk["KSID"])
    pair = (ids.number(request.master_sae_id), ids.number(request.slave_ids[0]))
    if known is not None and (known.closed or (known.master_sae_id, known.slave_sae_id) != pair):
        raise Forbidden(f"key stream {chunk['KSID']} is closed, or another pair's")
    if request.keys[0][0] != store.chunk_key_id(chunk["KSID"], chunk["index"]):
        raise Forbidden(f"the key ID is not that of chunk {chunk['index']} of key stream {chunk['KSID']}")
    activated = activation.accept_activation(config, caller, request)
    store.record_chunk(chunk["KSID"], chunk["index"], caller.id, request.master_sae_id, request.slave_ids[0],
                       chunk["chunk_size"], chunk["ttl"])
    return activated


def accept_close(config: KmeConfig, caller: OtherKme, ksid: str) -> None:
    """An end closed the stream at ``caller``, the other end's KME: closed here too, what was not read erased."""
    stream = _caller_stream(config, caller, ksid)
    if stream is not None and not stream.closed:
        store.close(stream, f"KME {caller.id} (an end closed it there)")


def _caller_stream(config: KmeConfig, caller: OtherKme, ksid: str) -> store.Stream | None:
    """The stream ``ksid`` if any; Forbidden if it is not on the caller's link."""
    stream = store.find(ksid)
    if stream is not None and stream.link_id != ids.number(caller.id):
        raise Forbidden(f"key stream {ksid} is not on the link with KME {caller.id}")
    return stream


def sae_of(config: KmeConfig, uri: str) -> Sae | None:
    """The SAE a URI names: ``qkd://<SAE_ID>@<KME>``, ``<scheme>://<SAE_ID>``, or the SAE ID alone (the forms the
    reference clients send)."""
    name = uri.split("://", 1)[1] if "://" in uri else uri
    sae_id = ids.from_text(name.split("@", 1)[0].split("/", 1)[0])
    return None if sae_id is None else config.saes_by_id.get(sae_id)
