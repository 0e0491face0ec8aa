"""Who is calling: the TLS peer certificate, as mod_ssl-style keys of the WSGI environ.

PeerCertificateMiddleware fills the keys from the socket gunicorn hands over;
the app reads only the environ, so it runs behind any server that sets them.
Clients cannot forge these keys: HTTP headers arrive as HTTP_* keys.
"""
import ssl
import weakref

VERIFY = "SSL_CLIENT_VERIFY"
SERIAL = "SSL_CLIENT_M_SERIAL"
CERT = "SSL_CLIENT_CERT"
SUBJECT = "SSL_CLIENT_S_DN"
_KEYS = (VERIFY, SERIAL, CERT, SUBJECT)


def peer_certificate_keys(sock) -> dict[str, str]:
    """The SSL_CLIENT_* keys for a connection; VERIFY is SUCCESS only for a verified certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return {VERIFY: "NONE"}
    der = sock.getpeercert(binary_form=True)
    # getpeercert() is {} when the certificate was not verified, None without one.
    info = sock.getpeercert()
    if not der or not info:
        return {VERIFY: "NONE"}
    subject = ",".join(f"{name}={value}" for rdn in info.get("subject", ()) for name, value in rdn)
    return {VERIFY: "SUCCESS", SERIAL: info["serialNumber"], CERT: ssl.DER_cert_to_PEM_cert(der), SUBJECT: subject}


class PeerCertificateMiddleware:
    """WSGI middleware: replaces any SSL_CLIENT_* keys by those of the gunicorn socket.

    Read once per connection: the server context refuses renegotiation
    (kme.interfaces.gunicorn_conf), so a connection's certificate never
    changes; keep-alive requests reuse what its first request read.
    """

    def __init__(self, app):
        self.app = app
        self._by_socket: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __call__(self, environ, start_response):
        for key in _KEYS:
            environ.pop(key, None)
        sock = environ.get("gunicorn.socket")
        if isinstance(sock, ssl.SSLSocket):
            keys = self._by_socket.get(sock)
            if keys is None:
                keys = self._by_socket[sock] = peer_certificate_keys(sock)
        else:
            keys = peer_certificate_keys(sock)
        environ.update(keys)
        return self.app(environ, start_response)


def client_serial(environ) -> int | None:
    """The verified client certificate's serial number as an integer, or None."""
    if environ.get(VERIFY) != "SUCCESS":
        return None
    try:
        return int(environ.get(SERIAL, ""), 16)
    except ValueError:
        return None
