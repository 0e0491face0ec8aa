"""A misbehaving peer KME for failure tests: accepts TLS on the peer's port, then misbehaves by ``mode``.

- "hang": reads the request and never answers;
- "garbage": answers 200 with an HTML body;
- "refuse": answers 409 with an ETSI Error body;
- "miscount": confirms the activation, with none of its keys activated;
- "broken": sends the headers of a chunked answer, half a chunk, and closes;
- "late": trickles a valid confirmation of the activation, byte by byte, until
  a cancel of it arrives; then finishes the confirmation, and confirms the
  cancel only once the test sets ``release_cancel`` (the order that once
  handed cancelled keys to a master SAE);
- "gated": confirms an activation or relay, trickling the answer (so that the caller's read timeout never
  runs out) until the test sets ``release_answer``, then at once;
- "corrupt": reads the whole request (an activation, relay or lease), then
  sends one TLS record that does not decrypt, as a damaged answer would;
- "refuse_certificate": TLS 1.3 only, and it trusts no CA of ours: it
  refuses the caller's certificate after the caller finished its handshake,
  so the request is already on its way (it counts the bytes that still came);
- "refuse_certificate_tls12": the same in TLS 1.2, where the refusal ends the
  handshake before the caller can send anything;
- "together": confirms a relay only once every fake sharing its ``barrier``
  received one (within BARRIER_SECONDS, else it never answers), and
  confirms releases.
"""
import json
import os
import socket
import ssl
import threading

TRICKLE_SECONDS = 0.4
# How long "together" waits for the other fakes' relays: longer than the caller's read timeout in tests.
BARRIER_SECONDS = 10


def _read_request(conn) -> tuple[bytes, bytes]:
    """The request line and headers, and the body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body


def _json_answer(payload: dict) -> tuple[bytes, bytes]:
    body = json.dumps(payload).encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head, body


class FakePeer:
    """Listens on 127.0.0.1:port with the peer's server certificate and misbehaves by ``mode``."""

    def __init__(self, port: int, cert: str, key: str, mode: str, untrusted_ca: str | None = None,
                 barrier: threading.Barrier | None = None):
        """``untrusted_ca``: with "refuse_certificate", the only CA whose client certificates it accepts;
        ``barrier``: with "together", the barrier it shares with the other fakes."""
        self.mode = mode
        self._barrier = barrier
        # Set when an activation arrives (the background worker's health probes also come here).
        self.activation_received = threading.Event()
        # Set when any request arrives (a probe, a progress exchange, an activation...).
        self.request_received = threading.Event()
        self.cancel_received = threading.Event()
        self.activation_answered = threading.Event()
        self.release_cancel = threading.Event()
        self.release_answer = threading.Event()
        self._stop = threading.Event()
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        if mode.startswith("refuse_certificate"):
            version = ssl.TLSVersion.TLSv1_2 if mode.endswith("tls12") else ssl.TLSVersion.TLSv1_3
            self._context.minimum_version = self._context.maximum_version = version
            self._context.verify_mode = ssl.CERT_REQUIRED
            self._context.load_verify_locations(untrusted_ca)
        # Bytes of requests that arrived after their certificate was refused ("refuse_certificate").
        self.bytes_after_refusal = 0
        self.refused = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except socket.timeout:
                continue
            thread = threading.Thread(target=self._handle, args=(raw,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, raw) -> None:
        raw.settimeout(5)
        try:
            conn = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self._connections.append(conn)
            conn.do_handshake()
        except ssl.SSLError:
            if self.mode.startswith("refuse_certificate"):
                self._drain_refused(conn)
            conn.close()
            return
        except OSError:
            raw.close()
            return
        try:
            head, body = _read_request(conn)
            self.request_received.set()
            line = head.split(b"\r\n")[0]
            if line.startswith((b"POST /api/v1/kme/activations/", b"POST /api/v1/kme/relays/")) and b"/cancel" in line:
                self.cancel_received.set()
                self._answer_cancel(conn, body)
            elif self.mode == "together" and line.startswith(b"POST /api/v1/kme/relays/") and b"/release" in line:
                conn.sendall(b"".join(_json_answer({"activation_ID": json.loads(body)["activation_ID"]})))
            elif self.mode == "corrupt" and line.startswith(b"POST /api/v1/kme/"):
                self.activation_received.set()
                self._corrupt(conn)
            elif line.startswith((b"POST /api/v1/kme/activations", b"POST /api/v1/kme/relays")):
                self.activation_received.set()
                self._answer_activation(conn, body)
        except (OSError, ValueError):
            conn.close()

    def _drain_refused(self, conn) -> None:
        """After the alert: read what the caller still sends until it closes, so no reset races the alert."""
        try:
            plain = socket.socket(fileno=os.dup(conn.fileno()))
        except OSError:
            # close() closed the connection meanwhile (the test is over): nothing left to drain.
            self.refused.set()
            return
        plain.settimeout(5)
        try:
            plain.shutdown(socket.SHUT_WR)
            while chunk := plain.recv(65536):
                self.bytes_after_refusal += len(chunk)
        except OSError:
            pass
        finally:
            plain.close()
            self.refused.set()

    @staticmethod
    def _corrupt(conn) -> None:
        """One application-data record of random bytes under the TLS layer: the caller cannot decrypt it."""
        plain = socket.socket(fileno=os.dup(conn.fileno()))
        plain.settimeout(5)
        try:
            plain.sendall(b"\x17\x03\x03\x00\x40" + os.urandom(64))
            plain.shutdown(socket.SHUT_WR)
        finally:
            plain.close()

    def _answer_activation(self, conn, body: bytes) -> None:
        if self.mode == "together":
            request = json.loads(body)
            try:
                self._barrier.wait(BARRIER_SECONDS)
            except threading.BrokenBarrierError:
                return
            conn.sendall(b"".join(_json_answer({"activation_ID": request["activation_ID"],
                                                "activated": len(request["keys"])})))
        elif self.mode == "gated":
            request = json.loads(body)
            head, answer = _json_answer({"activation_ID": request["activation_ID"], "activated": len(request["keys"])})
            conn.sendall(head)
            sent = 0
            while sent < len(answer) - 1 and not self.release_answer.wait(TRICKLE_SECONDS):
                conn.sendall(answer[sent:sent + 1])
                sent += 1
            conn.sendall(answer[sent:])
        elif self.mode == "garbage":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\n<b>hi</b>")
        elif self.mode == "miscount":
            head, answer = _json_answer({"activation_ID": json.loads(body)["activation_ID"], "activated": 0})
            conn.sendall(head + answer)
        elif self.mode == "refuse":
            answer = json.dumps({"message": "keys not available"}).encode()
            conn.sendall(b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(answer)).encode() + b"\r\n\r\n" + answer)
        elif self.mode == "broken":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"20\r\n{\"activation_ID\"")
            conn.close()
        elif self.mode == "late":
            request = json.loads(body)
            head, answer = _json_answer({"activation_ID": request["activation_ID"], "activated": len(request["keys"])})
            conn.sendall(head)
            sent = 0
            while sent < len(answer) - 1 and not self.cancel_received.is_set() and not self._stop.is_set():
                conn.sendall(answer[sent:sent + 1])
                sent += 1
                self.cancel_received.wait(TRICKLE_SECONDS)
            conn.sendall(answer[sent:])
            self.activation_answered.set()

    def _answer_cancel(self, conn, body: bytes) -> None:
        if self.mode != "late":
            return
        # The master KME's web worker acts on the confirmation first; the test
        # sets release_cancel once the SAE has its answer.
        self.release_cancel.wait(20)
        head, answer = _json_answer({"activation_ID": json.loads(body)["activation_ID"], "state": "cancelled"})
        conn.sendall(head + answer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for conn in self._connections:
            conn.close()
        for thread in self._threads:
            thread.join(5)
        for conn in self._connections:
            conn.close()
