"""The gunicorn worker of the KME: gthread, with a connection stage and the peer certificate in the environ.

Connection stage: gthread hands a new connection to a worker thread at
once, and the thread then waits for the TLS handshake and the request; a
client that connects and stays silent, stops mid-handshake or sends its
request a byte at a time holds the thread (the pool has a few). Here the
worker's own event loop does the TLS handshake and reads the request head
and a body of announced length without blocking; a thread gets the
connection only once the whole request is there. A client that sends
"Expect: 100-continue" gets the 100 from the stage, which then waits for the
body too; a chunked body is refused (411: every KME request has a
Content-Length). Every connection has STAGE_SECONDS for that (a kept-alive
connection too, for each request); then it is closed. In the thread, every
socket operation is bounded by STAGE_SECONDS as well (gthread makes the
socket blocking without a timeout): a client that does not read its answer
frees the thread then.

The stage and the thread use gunicorn's gthread internals (TConn, the
poller, enqueue_req, murder_pending): requirements.txt pins the gunicorn
release they were written for, and a test checks that they are there.

Requests that gunicorn itself refuses before the app sees them (a bad
request line, a lowercase method, a URI or headers too long, a broken chunked
body) are answered with an ETSI Error body in JSON too, never an HTML page.

Garbage collection is tuned once the app is loaded (kme.operations.collector).
"""
import errno
import json
import re
import selectors
import ssl
import time
from collections import deque
from functools import partial

from gunicorn import http, sock, util
from gunicorn.workers.gthread import ThreadWorker, TConn

from kme.interfaces.identity import PeerCertificateMiddleware
from kme.operations import collector

# How long a client has to complete the TLS handshake and send a whole request.
STAGE_SECONDS = 10.0
# A request whose head and body exceed this is handed over as it is (gunicorn refuses it).
STAGE_LIMIT = 1 << 20
_LENGTH = re.compile(rb"\ncontent-length:[ \t]*(\d+)[ \t]*\r?\n", re.IGNORECASE)
# A client that sends "Expect: 100-continue" waits for the server before it sends the body.
_EXPECT = re.compile(rb"\r\nexpect:[^\r\n]*", re.IGNORECASE)
_CHUNKED = re.compile(rb"\ntransfer-encoding:[^\n]*chunked", re.IGNORECASE)
# What the stage makes of the bytes of a request so far.
INCOMPLETE, WHOLE, CONTINUE, CHUNKED = "incomplete", "whole", "continue", "chunked"


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's error writer, with an ETSI Error body; the client's own bytes are not echoed."""
    body = json.dumps({"message": f"malformed HTTP request: {reason.lower()}"}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin1")
    util.write_nonblock(sock, head + body)


# gunicorn's workers call util.write_error for every request they refuse;
# this module is imported only by processes that run the KME's worker class.
util.write_error = write_json_error


def staged_request(data: bytes) -> str:
    """What the stage does with the bytes of a request so far: wait for more (INCOMPLETE), hand it to a thread
    (WHOLE), answer "100 Continue" and wait for the body (CONTINUE), or refuse a chunked body (CHUNKED).

    A head that ends its lines with LF alone is whole as soon as it ends: gunicorn refuses it at once (400).
    """
    end = data.find(b"\r\n\r\n")
    bare = data.find(b"\n\n")
    if end < 0 or 0 <= bare < end:
        if bare >= 0:
            return WHOLE
        return WHOLE if len(data) >= STAGE_LIMIT else INCOMPLETE
    if _CHUNKED.search(data, 0, end + 2):
        return CHUNKED
    length = _LENGTH.search(data, 0, end + 2)
    if length is None or len(data) >= min(end + 4 + int(length.group(1)), STAGE_LIMIT):
        return WHOLE
    return CONTINUE if _EXPECT.search(data, 0, end + 2) else INCOMPLETE


class _BoundedConn(TConn):
    """A connection whose socket operations in a worker thread are bounded by STAGE_SECONDS."""

    def init(self):
        # Called by gthread's handle() right after it made the socket blocking.
        self.sock.settimeout(STAGE_SECONDS)
        super().init()


class _Staged:
    """A connection in the connection stage."""

    __slots__ = ("tls", "client", "server", "deadline", "conn", "buffer", "handshaken", "continued", "done")

    def __init__(self, tls, client, server, conn: TConn | None):
        self.tls, self.client, self.server, self.conn = tls, client, server, conn
        self.deadline = time.monotonic() + STAGE_SECONDS
        self.buffer = b""
        # A kept-alive connection did its handshake with its first request.
        self.handshaken = conn is not None
        # "100 Continue" sent: the body follows.
        self.continued = False
        self.done = False


class PeerCertificateWorker(ThreadWorker):
    """A threaded worker with a connection stage, whose every request carries SSL_CLIENT_* keys."""

    def init_process(self):
        self.staged: deque[_Staged] = deque()
        super().init_process()

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = PeerCertificateMiddleware(self.wsgi)
        collector.tune()

    def accept(self, listener):
        """Take a new connection into the stage: non-blocking TLS handshake, then the request."""
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        try:
            tls = sock.ssl_context(self.cfg).wrap_socket(client, server_side=True, do_handshake_on_connect=False,
                                                         suppress_ragged_eofs=True)
            tls.setblocking(False)
        except OSError:
            client.close()
            return
        self.nr_conns += 1
        self._stage(_Staged(tls, address, listener.getsockname(), None))

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection's next request goes through the stage too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._stage(_Staged(conn.sock, conn.client, conn.server, conn))

    def _stage(self, staged: _Staged) -> None:
        self.staged.append(staged)
        self.poller.register(staged.tls, selectors.EVENT_READ, partial(self._advance, staged))
        # Bytes already decrypted are not seen by the poller.
        if staged.conn is not None and staged.tls.pending():
            self._advance(staged, staged.tls)

    def _advance(self, staged: _Staged, _fileobj) -> None:
        try:
            if not staged.handshaken:
                staged.tls.do_handshake()
                staged.handshaken = True
            while (verdict := staged_request(staged.buffer)) != WHOLE:
                if verdict == CHUNKED:
                    write_json_error(staged.tls, 411, "Length Required", "")
                    self._drop(staged)
                    return
                if verdict == CONTINUE and not staged.continued:
                    staged.tls.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    staged.continued = True
                chunk = staged.tls.recv(65536)
                if not chunk:
                    self._drop(staged)
                    return
                staged.buffer += chunk
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (ssl.SSLError, OSError):
            self._drop(staged)
            return
        if staged.continued:
            # The client has its 100: gunicorn must not send another.
            staged.buffer = _EXPECT.sub(b"", staged.buffer, count=1)
        self._dispatch(staged)

    def _dispatch(self, staged: _Staged) -> None:
        self.poller.unregister(staged.tls)
        staged.done = True
        conn = staged.conn or _BoundedConn(self.cfg, staged.tls, staged.client, staged.server)
        conn.initialized = True
        conn.data_ready = True
        conn.parser = http.get_parser(self.cfg, staged.tls, staged.client)
        conn.parser.unreader.unread(staged.buffer)
        self.enqueue_req(conn)

    def _drop(self, staged: _Staged) -> None:
        try:
            self.poller.unregister(staged.tls)
        except (KeyError, ValueError, OSError):
            pass
        staged.done = True
        self.nr_conns -= 1
        util.close(staged.tls)

    def murder_pending(self):
        """Close the connections whose stage took longer than STAGE_SECONDS."""
        super().murder_pending()
        now = time.monotonic()
        while self.staged and (self.staged[0].done or self.staged[0].deadline <= now):
            staged = self.staged.popleft()
            if not staged.done:
                self._drop(staged)
