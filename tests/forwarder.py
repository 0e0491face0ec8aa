"""A TCP forwarder on loopback, as the address in front of several hosts would be: new connections go to the
target chosen now; bytes pass through untouched (TLS stays end to end)."""
import socket
import threading


class Forwarder:
    """Listens on a loopback port and forwards each connection to ``target`` (a port), until close()."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            # Inside: the forwarder may close both ends before this thread runs.
            source.settimeout(None)
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def switch(self, target: int) -> None:
        """Send new connections to ``target``; open ones are closed, as a load balancer drains a host."""
        self.target = target
        with self._lock:
            ends, self._sockets = self._sockets, []
        for end in ends:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            for end in self._sockets:
                end.close()
