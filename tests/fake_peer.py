"""A misbehaving peer KME for failure tests: accepts TLS on the peer's port, then hangs or talks garbage."""
import socket
import ssl
import threading


class FakePeer:
    """Listens on 127.0.0.1:port with the peer's server certificate; ``mode`` is "hang" or "garbage"."""

    def __init__(self, port: int, cert: str, key: str, mode: str):
        self.mode = mode
        # Set when an activation arrives (the background worker's health probes also come here).
        self.activation_received = threading.Event()
        self._stop = threading.Event()
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self._connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except socket.timeout:
                continue
            raw.settimeout(5)
            try:
                conn = self._context.wrap_socket(raw, server_side=True)
                request = conn.recv(65536)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            self._connections.append(conn)
            if request.startswith(b"POST /api/v1/kme/activations"):
                self.activation_received.set()
            if self.mode == "garbage":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\n<b>hi</b>")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for conn in self._connections:
            conn.close()
