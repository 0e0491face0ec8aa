"""The real SAE interface: gunicorn with several workers, mutual TLS, session certificates."""
import base64
import inspect
import json
import os
import socket
import ssl
import subprocess
import sys
import uuid

import pytest
import requests

from kme.errors import KEYS_NOT_FOUND
from kme.interfaces import gunicorn_worker
from kme.interfaces.gunicorn_worker import CHUNKED, CONTINUE, INCOMPLETE, WHOLE, staged_request
from tests.support import (
    ROOT,
    Ledger,
    run_cli,
    sae_port,
    sae_session,
    start_sae_interface,
    tls_client_context,
    write_config,
    write_keys,
)


@pytest.fixture(scope="module")
def kme(tmp_path_factory, pki):
    folder = tmp_path_factory.mktemp("gunicorn")
    config = write_config(folder, pki)
    write_keys(folder / "keys" / "k1.cor", 500)
    assert run_cli(["ingest-keys"], config).returncode == 0
    server = start_sae_interface(config, folder / "gunicorn.log", workers=2)
    yield config
    server.stop()


@pytest.fixture(scope="module")
def url(kme):
    return f"https://127.0.0.1:{sae_port(kme)}/api/v1"


def status(session, url) -> int:
    return session.get(f"{url}/keys/2/status", timeout=10).json()["stored_key_count"]


def test_get_key_get_and_post_forms_and_both_post_conditions(pki, kme, url):
    master, slave = sae_session(pki, 1, 1), sae_session(pki, 1, 2)
    before = status(master, url)
    plain = master.get(f"{url}/keys/2/enc_keys", timeout=10).json()["keys"]
    with_query = master.get(f"{url}/keys/2/enc_keys?number=2&size=1024", timeout=10).json()["keys"]
    posted = master.post(f"{url}/keys/2/enc_keys", json={"number": 3, "size": 128}, timeout=10).json()["keys"]
    assert [len(base64.b64decode(k["key"])) for k in plain + with_query + posted] == [32, 128, 128, 16, 16, 16]
    # Pool keys taken: 1 + 2*4 + 3*1; stored_key_count counts 256-bit keys.
    assert status(master, url) == before - 12

    by_post = slave.post(f"{url}/keys/1/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in
                                                                       plain + with_query]}, timeout=10)
    assert by_post.json()["keys"] == plain + with_query
    for key in posted:
        response = slave.get(f"{url}/keys/1/dec_keys", params={"key_ID": key["key_ID"]}, timeout=10)
        assert response.json()["keys"] == [key]
    again = slave.get(f"{url}/keys/1/dec_keys", params={"key_ID": posted[0]["key_ID"]}, timeout=10)
    assert again.status_code == 400 and again.json() == {"message": KEYS_NOT_FOUND}
    ledger = Ledger(kme.parent / "kme.db")
    assert ledger.waiting() == 0
    ledger.assert_exact(1)


def test_error_answers_are_etsi_json_over_tls(pki, url):
    master = sae_session(pki, 1, 1)
    for response in (master.get(f"{url}/keys/2/enc_keys?size=7", timeout=10),
                     master.delete(f"{url}/keys/2/enc_keys", timeout=10),
                     master.get(f"{url}/nowhere", timeout=10),
                     master.post(f"{url}/keys/2/enc_keys", data=b"[" * 100_000, timeout=10)):
        assert response.status_code in (400, 404, 405, 413)
        assert response.headers["Content-Type"] == "application/json"
        assert set(response.json()) <= {"message", "details"}


def test_no_client_certificate_is_refused_in_the_handshake(pki, kme):
    context = tls_client_context(pki, None)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        with socket.create_connection(("127.0.0.1", sae_port(kme)), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                # TLS 1.3 reports the refusal on the first read.
                tls.sendall(b"GET /api/v1/sae/info/me HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert tls.recv(100) == b""
                raise ssl.SSLError("connection closed without an answer")


def test_certificate_from_another_ca_is_refused(pki, url):
    # SAE 3 is a client of KME 2: its certificate comes from KME 2's SAE CA.
    stranger = sae_session(pki, 2, 3)
    with pytest.raises(requests.exceptions.RequestException):
        stranger.get(f"{url}/sae/info/me", timeout=10)


def test_valid_certificate_with_unregistered_serial_is_401_json(pki, url):
    unknown = sae_session(pki, 1, 9)
    response = unknown.get(f"{url}/keys/2/enc_keys", timeout=10)
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["message"]


def test_health_details_go_to_registered_saes_only(pki, url):
    """The checks name the database, the key folders and the KEK's source: not for any certificate of the CA."""
    base = url.removesuffix("/api/v1")
    stranger = sae_session(pki, 1, 9).get(f"{base}/healthz", timeout=10)
    assert stranger.json() == {"status": stranger.json()["status"]} and "keys" not in stranger.text
    known = sae_session(pki, 1, 1).get(f"{base}/healthz", timeout=10).json()
    assert stranger.status_code in (200, 503) and {"checks", "encryption_at_rest"} <= set(known)


def test_forged_identity_headers_are_ignored(pki, url):
    unknown = sae_session(pki, 1, 9)
    serial = format(int.from_bytes(bytes(pki.serials["sae1"]), "big"), "X")
    response = unknown.get(f"{url}/sae/info/me", timeout=10,
                           headers={"SSL-CLIENT-M-SERIAL": serial, "SSL_CLIENT_VERIFY": "SUCCESS"})
    assert response.status_code == 401


def test_dec_keys_by_an_sae_that_is_not_the_slave_is_401(pki, url):
    master = sae_session(pki, 1, 1)
    key = master.get(f"{url}/keys/2/enc_keys", timeout=10).json()["keys"][0]
    response = master.get(f"{url}/keys/1/dec_keys", params={"key_ID": key["key_ID"]}, timeout=10)
    assert response.status_code == 401 and response.json()["message"]
    assert sae_session(pki, 1, 2).get(f"{url}/keys/1/dec_keys", params={"key_ID": key["key_ID"]},
                                      timeout=10).json()["keys"] == [key]


def test_unknown_key_id_is_400_over_tls(pki, url):
    response = sae_session(pki, 1, 2).get(f"{url}/keys/1/dec_keys", params={"key_ID": str(uuid.uuid4())},
                                          timeout=10)
    assert response.status_code == 400 and response.json() == {"message": KEYS_NOT_FOUND}


def raw_exchange(pki, kme, request: bytes) -> tuple[str, dict, bytes]:
    """Send raw bytes over mutual TLS as SAE 1; the status line, headers and body of the answer."""
    context = tls_client_context(pki, pki.client(1, 1))
    with socket.create_connection(("127.0.0.1", sae_port(kme)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := tls.recv(65536)):
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            status, *lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines)
            while len(body) < int(headers.get("Content-Length", 0)) and (chunk := tls.recv(65536)):
                body += chunk
    return status, headers, body


MALFORMED_HTTP = [
    ("URI too long", b"GET /api/v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "414"),
    ("control bytes in the request line", b"GET /api/v1/\x01\x02 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ("lowercase method", b"get /api/v1/sae/info/me HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ("too many headers", b"GET /api/v1/sae/info/me HTTP/1.1\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", "431"),
    # Every KME request announces its length: a chunked body is refused by the connection stage, at once.
    ("chunked body", b"POST /api/v1/keys/2/enc_keys HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n\r\n", "411"),
    # Lines ended by LF alone: answered at once, not after the stage's 10 s.
    ("LF-only line ends", b"GET /api/v1/keys/2/status HTTP/1.1\nHost: x\n\n", "400"),
]


@pytest.mark.parametrize("case, request_bytes, status", MALFORMED_HTTP, ids=[case[0] for case in MALFORMED_HTTP])
def test_malformed_http_gets_an_etsi_json_body(pki, kme, case, request_bytes, status):
    before = Ledger(kme.parent / "kme.db").assert_exact(1)
    line, headers, body = raw_exchange(pki, kme, request_bytes)
    assert line.split()[1] == status, (line, body)
    assert headers["Content-Type"] == "application/json"
    assert set(json.loads(body)) == {"message"}
    assert Ledger(kme.parent / "kme.db").assert_exact(1) == before


def half_client_hello() -> bytes:
    """The first half of a real TLS ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    return hello[:len(hello) // 2]


def test_stalled_connections_do_not_hold_the_threads_an_sae_needs(tmp_path, pki):
    config = write_config(tmp_path, pki)
    write_keys(tmp_path / "keys" / "k1.cor", 10)
    server = start_sae_interface(config, tmp_path / "gunicorn.log", workers=1, threads=2)
    port = sae_port(config)
    stalled = []
    try:
        # Ten times the threads: silent connections, half handshakes, and slow requests with a valid certificate.
        for _ in range(20):
            stalled.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for _ in range(20):
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            raw.sendall(half_client_hello())
            stalled.append(raw)
        # With a registered SAE's certificate: a body that stops, a chunked body and a body announced with
        # "Expect: 100-continue" that never come.
        for head in (b"GET /api/v1/keys/2/status HTTP/1.1\r\nHost: kme\r\nContent-Length: 10\r\n\r\n{",
                     b"POST /api/v1/keys/2/enc_keys HTTP/1.1\r\nHost: kme\r\nTransfer-Encoding: chunked\r\n\r\n",
                     b"POST /api/v1/keys/2/enc_keys HTTP/1.1\r\nHost: kme\r\nContent-Length: 20\r\n"
                     b"Expect: 100-continue\r\n\r\n"):
            for _ in range(5):
                slow = tls_client_context(pki, pki.client(1, 1)).wrap_socket(
                    socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="127.0.0.1")
                slow.sendall(head)
                stalled.append(slow)
        # Well within the 10 s a stalled connection is given: the SAE is served at once, twice.
        with sae_session(pki, 1, 1) as session:
            for _ in range(2):
                assert session.get(f"https://127.0.0.1:{port}/api/v1/keys/2/status", timeout=5).status_code == 200
    finally:
        for raw in stalled:
            raw.close()
        server.stop()


@pytest.mark.parametrize("data, verdict", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n", INCOMPLETE),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", WHOLE),
    (b"GET / HTTP/1.1\nHost: x\n\n", WHOLE),
    (b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n{}", INCOMPLETE),
    (b"POST / HTTP/1.1\r\ncontent-length:  4\r\n\r\n{\"a", INCOMPLETE),
    (b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n{\"\"}", WHOLE),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", CHUNKED),
    (b"POST / HTTP/1.1\r\nContent-Length: 4000\r\nExpect: 100-continue\r\n\r\n", CONTINUE),
    (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n{}", WHOLE),
])
def test_a_request_is_handed_to_a_thread_only_when_whole(data, verdict):
    assert staged_request(data) == verdict


def test_the_gthread_internals_the_worker_uses_are_there():
    """The connection stage subclasses and drives gthread's worker: a gunicorn release that moved them fails
    here, not in production (requirements.txt pins the release)."""
    from gunicorn.workers.gthread import TConn, ThreadWorker

    for name in ("enqueue_req", "murder_pending", "on_client_socket_readable", "accept", "init_process",
                 "handle"):
        assert callable(getattr(ThreadWorker, name, None)), name
    conn = TConn.__new__(TConn)
    conn.__dict__.update(initialized=True)
    assert conn.init() is None and {"init", "close"} <= set(vars(TConn))
    assert callable(gunicorn_worker.http.get_parser) and callable(gunicorn_worker.util.write_nonblock)
    assert "conn.sock.setblocking(True)" in inspect.getsource(ThreadWorker.handle)


def test_the_master_loads_the_apps_modules_and_builds_no_app(kme):
    """gunicorn reads its settings in the master: the app's modules are imported there, once, so that every worker
    forks with them (kme.interfaces.startup.preload); the app itself is built only in the workers."""
    probe = ("import sys; from kme.interfaces import startup; from kme.interfaces.gunicorn_conf import settings; "
             "settings('saes_https_interface'); print(sorted(set(startup._APP_MODULES) - set(sys.modules)), "
             "'wsgi' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=dict(os.environ, KME_CONFIG=str(kme)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "False"]


def test_a_client_expecting_100_continue_sends_its_body_after_it(pki, kme):
    body = json.dumps({"key_IDs": [{"key_ID": str(uuid.uuid4())}]}).encode()
    raw = socket.create_connection(("127.0.0.1", sae_port(kme)), timeout=5)
    with tls_client_context(pki, pki.client(1, 2)).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /api/v1/keys/1/dec_keys HTTP/1.1\r\nHost: kme\r\nContent-Type: application/json\r\n"
                    b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert tls.recv(64).startswith(b"HTTP/1.1 100 Continue")
        tls.sendall(body)
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and KEYS_NOT_FOUND.encode() in answer

