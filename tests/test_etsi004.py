"""ETSI GS QKD 004 key streams between two SAEs of one KME, through the real `flask serve-etsi004` process over
TLS, driven by a raw-socket client written here from the wire format alone (one TLS connection per call, as the
reference clients make them; version 1.0.1 of the frame): both ends read the same chunks by index, once each;
the slave opening first; a KSID in use; TTL; CLOSE; a restart mid-stream; malformed frames. And by an
independent client: the C library that wg-qrotator bundles (version 2.1.1 of the frame)."""
import base64
import ctypes
import json
import socket
import ssl
import struct
import uuid
import zipfile
from pathlib import Path

import pytest
import requests

from tests.support import (
    ROOT,
    Ledger,
    free_port,
    load_json,
    run_cli,
    start_debug_page,
    start_etsi004_server,
    start_ingest_worker,
    wait_until,
    write_config,
    write_keys,
)

ZONE_KEYS = 400
WG_QROTATOR_WHEEL = ROOT / ".venv" / "wheels" / "wg_qrotator-0.1.4-py3-none-any.whl"
VERSION = bytes([1, 0, 1])


class Client:
    """An SAE's ETSI GS QKD 004 client: a TLS connection per call, each frame an 8-byte header and a payload."""

    def __init__(self, port: int, pki, sae: int, kme: int = 1):
        self.port = port
        self.context = ssl.create_default_context(cafile=pki.server_ca)
        self.context.load_cert_chain(*pki.client(kme, sae))

    def connect(self) -> ssl.SSLSocket:
        return self.context.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=10),
                                        server_hostname="127.0.0.1")

    def call(self, service: int, payload: bytes) -> bytes:
        with self.connect() as connection:
            connection.sendall(VERSION + bytes([service]) + struct.pack("!I", len(payload)) + payload)
            header = read_exactly(connection, 8)
            assert header[:3] == VERSION and header[3] == service + 1
            return read_exactly(connection, struct.unpack("!I", header[4:])[0])

    def open_connect(self, source, destination, chunk: int = 32, ttl: int = 3600, ksid: uuid.UUID | None = None,
                     min_bps: int = 0):
        qos = struct.pack("!7I", chunk, 2**32 - 1, min_bps, 0, 0, 5000, ttl) + b"application/json".ljust(256, b"\0")
        answer = self.call(0x02, f"{source}".encode() + b"\0" + f"{destination}".encode() + b"\0" + qos
                           + (ksid.bytes if ksid else bytes(16)))
        status = struct.unpack("!I", answer[:4])[0]
        granted = struct.unpack("!7I", answer[4:32])
        return status, granted, uuid.UUID(bytes=answer[-16:])

    def get_key(self, ksid: uuid.UUID, index: int, metadata_size: int = 1024) -> tuple[int, bytes]:
        answer = self.call(0x04, ksid.bytes + struct.pack("!II", index, metadata_size))
        status, answered_index, size = struct.unpack("!III", answer[:12])
        assert answered_index == index
        return status, answer[12:12 + size]

    def close(self, ksid: uuid.UUID) -> int:
        return struct.unpack("!I", self.call(0x08, ksid.bytes))[0]


def read_exactly(connection, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


class Kme:
    """A KME with SAEs 1 and 2, its zone's key file ingested, and its ETSI 004 server."""

    def __init__(self, folder, pki):
        self.folder, self.pki = folder, pki
        self.port = free_port()
        certs = pki.folder / "kme1"
        # KME 2, linked, is configured (SAE 3 is its SAE) but never started.
        peer = {"id": 2, "key_directory_to_watch": "keys-2", "inter_kme_bind_address": f"127.0.0.1:{free_port()}",
                "https_client_authentication_certificate": str(certs / "kme1-to-kme2.pfx"),
                "https_client_authentication_certificate_password": "password", "server_ca_cert_path": pki.server_ca}
        (folder / "keys-2").mkdir(parents=True)
        self.config = write_config(folder, pki, remote_saes=[(3, 2)], other_kmes=[peer],
                                   housekeeping_interval_seconds=0.2,
                                   debugging_http_interface=f"127.0.0.1:{free_port()}",
                                   etsi004_interface={"listen_address": f"127.0.0.1:{self.port}",
                                                      "ca_client_cert_path": str(certs / "ca_saes.crt"),
                                                      "server_cert_path": str(certs / "kme_server.crt"),
                                                      "server_key_path": str(certs / "kme_server.key")})
        write_keys(folder / "keys" / "zone.cor", ZONE_KEYS)
        self.ingest = start_ingest_worker(self.config, folder / "ingest.log")
        self.ledger = Ledger(folder / "kme.db")
        wait_until(lambda: self.ledger.link(1)["ingested"] == ZONE_KEYS, 20)
        self.server = None
        self.start_server()

    def start_server(self) -> None:
        self.server = start_etsi004_server(self.config, self.folder / "etsi004.log")

    def client(self, sae: int) -> Client:
        return Client(self.port, self.pki, sae)

    def stop(self) -> None:
        for process in (self.server, self.ingest):
            process.kill()


@pytest.fixture(scope="module")
def kme(tmp_path_factory, pki):
    started = Kme(tmp_path_factory.mktemp("etsi004"), pki)
    yield started
    started.stop()
    started.ledger.assert_exact(1)


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_both_ends_read_the_same_chunks_by_index_once_each(kme, chunk):
    master, slave = kme.client(1), kme.client(2)
    status, granted, ksid = master.open_connect(1, 2, chunk)
    assert status == 0 and granted[0] == chunk and ksid.int != 0
    assert slave.open_connect("qkd://1@kme1", "qkd://2@kme1", chunk, ksid=ksid)[0] == 0
    at_master = [master.get_key(ksid, index) for index in range(5)]
    at_slave = [slave.get_key(ksid, index) for index in (4, 3, 2, 1, 0)][::-1]
    assert at_master == at_slave and all(status == 0 and len(data) == chunk for status, data in at_master)
    assert len({data for _status, data in at_master}) == 5
    # Once to each end: a second read of an index is refused.
    assert master.get_key(ksid, 2) == (2, b"") and slave.get_key(ksid, 2) == (2, b"")


def test_the_slave_opening_first_waits_for_its_master(kme):
    master, slave = kme.client(1), kme.client(2)
    ksid = uuid.uuid4()
    assert slave.open_connect(1, 2, ksid=ksid)[0] == 1
    assert slave.get_key(ksid, 0) == (3, b"")
    assert master.open_connect(1, 2, ksid=ksid)[0] == 0
    assert slave.open_connect(1, 2, ksid=ksid)[0] == 0
    assert master.get_key(ksid, 0) == slave.get_key(ksid, 0)


def test_a_chunk_size_beyond_the_limits_opens_the_stream_with_the_qos_granted(kme):
    master = kme.client(1)
    status, granted, ksid = master.open_connect(1, 2, chunk=100_000)
    # max_key_size is 8192 bits: chunks of 1024 bytes; the client takes 7 with a KSID as success.
    assert status == 7 and granted[0] == 1024 and ksid.int != 0
    status, chunk = master.get_key(ksid, 0)
    assert status == 0 and len(chunk) == 1024


def test_a_min_bps_above_the_links_measured_rate_opens_the_stream_with_the_rate_granted(kme):
    master = kme.client(1)
    # The zone's one file, ZONE_KEYS keys ingested moments ago, measures far above 1 bit/s and far below 2^31.
    assert master.open_connect(1, 2, min_bps=1)[0] == 0
    status, granted, ksid = master.open_connect(1, 2, min_bps=2**31)
    assert status == 7 and ksid.int != 0
    assert 1 < granted[2] < 2**31 and granted[2] <= ZONE_KEYS * 256


def test_a_ksid_in_use_is_refused(kme):
    master = kme.client(1)
    status, _, ksid = master.open_connect(1, 2)
    assert status == 0
    assert master.open_connect(1, 2, ksid=ksid)[0] == 5
    assert kme.client(2).open_connect(2, 1, ksid=ksid)[0] == 5


def test_close_ends_the_stream_and_erases_what_an_end_did_not_read(kme):
    master, slave = kme.client(1), kme.client(2)
    _, _, ksid = master.open_connect(1, 2)
    slave.open_connect(1, 2, ksid=ksid)
    assert master.get_key(ksid, 0)[0] == 0
    waiting = kme.ledger.waiting()
    assert slave.close(ksid) == 0
    assert kme.ledger.waiting() == waiting - 1
    assert master.get_key(ksid, 1) == (3, b"") and slave.get_key(ksid, 0) == (3, b"")


def test_a_chunk_older_than_the_ttl_is_erased(kme):
    master, slave = kme.client(1), kme.client(2)
    _, _, ksid = master.open_connect(1, 2, ttl=1)
    slave.open_connect(1, 2, ttl=1, ksid=ksid)
    assert master.get_key(ksid, 0)[0] == 0
    chunk_key = kme.ledger._query("SELECT COUNT(*) FROM stream_chunks WHERE ksid = ?", str(ksid))
    assert chunk_key == [(1,)]
    wait_until(lambda: "chunks expired" in (kme.folder / "ingest.log").read_text() and
               str(ksid) in (kme.folder / "ingest.log").read_text(), 20)
    assert slave.get_key(ksid, 0) == (2, b"")


def test_a_restart_of_the_server_keeps_the_stream(kme):
    master, slave = kme.client(1), kme.client(2)
    _, _, ksid = master.open_connect(1, 2)
    slave.open_connect(1, 2, ksid=ksid)
    before = [master.get_key(ksid, index)[1] for index in range(3)]
    kme.server.kill()
    kme.start_server()
    assert [slave.get_key(ksid, index)[1] for index in range(3)] == before
    assert master.get_key(ksid, 3) == slave.get_key(ksid, 3)


def test_streams_with_an_sae_of_no_one_are_refused_and_one_whose_peer_kme_is_down_gives_nothing(kme):
    master = kme.client(1)
    # SAE 3 is KME 2's, linked but down: the master's end opens, its chunks cannot be made.
    status, _, ksid = master.open_connect(1, 3)
    assert status == 0
    assert master.get_key(ksid, 0) == (4, b"")
    # Provably not activated: the index may be made later, nothing is held back.
    assert kme.ledger._query("SELECT COUNT(*) FROM stream_chunks WHERE ksid = ?", str(ksid)) == [(0,)]
    assert master.open_connect(1, "nobody")[0] == 4
    assert master.open_connect(2, 1)[0] == 4
    assert master.get_key(uuid.uuid4(), 0) == (4, b"")


@pytest.mark.parametrize("frame, cut", [
    (VERSION + b"\x02", True),
    (bytes([2, 0, 0, 2]) + struct.pack("!I", 0), False),
    (VERSION + b"\x02" + struct.pack("!I", 1 << 20), False),
    (VERSION + b"\x02" + struct.pack("!I", 300) + b"\0" * 10, True),
    (VERSION + b"\x03" + struct.pack("!I", 0), False),
    (VERSION + b"\x04" + struct.pack("!I", 5) + b"\0" * 5, False),
], ids=["a short header", "a wrong version", "a length beyond the limit", "a truncated payload",
        "an answer's service type", "a payload of the wrong length"])
def test_a_malformed_frame_closes_its_connection_and_harms_nothing(kme, frame, cut):
    client = kme.client(1)
    waiting = kme.ledger.waiting()
    with client.connect() as connection:
        connection.sendall(frame)
        if cut:
            # The client ends its side (TLS close_notify) with the frame cut short: the server closes too.
            connection.unwrap()
        else:
            assert read_exactly(connection, 8) == b""
    assert kme.ledger.waiting() == waiting
    assert client.open_connect(1, 2)[0] == 0


def test_a_certificate_of_no_sae_of_this_kme_gets_nothing(kme, pki):
    stranger = Client(kme.port, pki, 1)
    stranger.context = ssl.create_default_context(cafile=pki.server_ca)
    stranger.context.load_cert_chain(*pki.client(2, 3))
    # Another KME's SAE CA: the server ends the handshake (with TLS 1.3 the client learns it at its first read).
    try:
        with stranger.connect() as connection:
            connection.sendall(VERSION + b"\x08" + struct.pack("!I", 16) + bytes(16))
            answer = read_exactly(connection, 8)
    except (ssl.SSLError, ConnectionResetError):
        answer = b""
    assert answer == b""



def test_operators_see_the_streams_without_key_material(kme):
    master, slave = kme.client(1), kme.client(2)
    _, _, ksid = master.open_connect(1, 2)
    slave.open_connect(1, 2, ksid=ksid)
    chunk = master.get_key(ksid, 0)[1]
    status = run_cli(["kme-status"], kme.config)
    assert status.returncode == 0 and "key stream (ETSI GS QKD 004)" in status.stdout
    (line,) = [line for line in status.stdout.splitlines() if str(ksid) in line]
    assert line.split()[-2:] == ["1", "1"]
    page = start_debug_page(kme.config, kme.folder / "debug.log")
    try:
        address = "http://" + load_json(kme.config)["this_kme"]["debugging_http_interface"]
        (listed,) = [stream for stream in requests.get(f"{address}/streams", timeout=10).json()
                     if stream["ksid"] == str(ksid)]
        assert (listed["master"], listed["slave"], listed["chunks_made"], listed["chunks_waiting"]) == (1, 2, 1, 1)
        metrics = requests.get(f"{address}/metrics", timeout=10).text
        assert 'kme_stream_chunks{state="made"}' in metrics
    finally:
        page.kill()
    for text in (status.stdout, json.dumps(listed), metrics, (kme.folder / "etsi004.log").read_text()):
        assert chunk.hex() not in text and base64.b64encode(chunk).decode() not in text


class _Bytes(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("data", ctypes.c_void_p)]


class _GetKeyAnswer(ctypes.Structure):
    _fields_ = [("status", ctypes.c_uint32), ("index", ctypes.c_uint32), ("key", _Bytes), ("metadata", _Bytes)]


class _CloseAnswer(ctypes.Structure):
    _fields_ = [("status", ctypes.c_uint32)]


@pytest.fixture(scope="module")
def wg_qrotator_client(tmp_path_factory):
    """The ETSI GS QKD 004 client library that wg-qrotator's wheel bundles (libclient_api.so, loaded with ctypes as
    wg-qrotator does; `make test` fetches the wheel): an independent client, speaking version 2.1.1 of the frame."""
    with zipfile.ZipFile(WG_QROTATOR_WHEEL) as wheel:
        library = Path(wheel.extract("wg_qrotator/kms_so/libclient_api.so", tmp_path_factory.mktemp("wgq")))
    client = ctypes.CDLL(str(library))
    text, number = ctypes.c_char_p, ctypes.c_int
    client.openConnect.argtypes = [text, text, text, number, text, text, text, number]
    client.openConnect.restype = text
    client.getKey.argtypes = [text, text, text, number, ctypes.c_char, number, text]
    client.getKey.restype = _GetKeyAnswer
    client.close.argtypes = [text, text, text, number, text]
    client.close.restype = _CloseAnswer
    return client


def test_wg_qrotators_client_library_reads_a_stream_at_both_ends(kme, pki, wg_qrotator_client):
    """As wg-qrotator calls it: each end opens with the master's and the slave's SAE IDs, reads index after index,
    and closes."""
    ends = {sae: [path.encode() for path in pki.client(1, sae)] for sae in (1, 2)}
    address = b"127.0.0.1"
    ksid = wg_qrotator_client.openConnect(*ends[1], address, kme.port, b"1", b"2", None, 32)
    assert uuid.UUID(ksid.decode()).int != 0
    assert wg_qrotator_client.openConnect(*ends[2], address, kme.port, b"1", b"2", ksid, 32) == ksid
    for index in range(3):
        answers = [wg_qrotator_client.getKey(*ends[sae], address, kme.port, ctypes.c_char(0), index, ksid)
                   for sae in (1, 2)]
        assert [(answer.status, answer.index, answer.key.size) for answer in answers] == [(0, index, 32)] * 2
        chunks = [ctypes.string_at(answer.key.data, answer.key.size) for answer in answers]
        assert chunks[0] == chunks[1]
    assert wg_qrotator_client.close(*ends[1], address, kme.port, ksid).status == 0
