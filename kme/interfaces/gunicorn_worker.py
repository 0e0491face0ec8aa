"""The gunicorn worker of the KME: gthread, with the peer certificate placed in the environ.

Requests that gunicorn itself refuses before the app sees them (a bad
request line, a lowercase method, a URI or headers too long, a broken chunked
body) are answered with an ETSI Error body in JSON too, never an HTML page.
"""
import json

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from kme.interfaces.identity import PeerCertificateMiddleware


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's error writer, with an ETSI Error body; the client's own bytes are not echoed."""
    body = json.dumps({"message": f"malformed HTTP request: {reason.lower()}"}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin1")
    util.write_nonblock(sock, head + body)


# gunicorn's workers call util.write_error for every request they refuse;
# this module is imported only by processes that run the KME's worker class.
util.write_error = write_json_error


class PeerCertificateWorker(ThreadWorker):
    """A threaded worker whose every request carries SSL_CLIENT_* keys (kme.interfaces.identity)."""

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = PeerCertificateMiddleware(self.wsgi)
