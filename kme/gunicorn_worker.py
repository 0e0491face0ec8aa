"""The gunicorn worker of the KME: gthread, with the peer certificate placed in the environ."""
from gunicorn.workers.gthread import ThreadWorker

from kme.identity import PeerCertificateMiddleware


class PeerCertificateWorker(ThreadWorker):
    """A threaded worker whose every request carries SSL_CLIENT_* keys (kme.identity)."""

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = PeerCertificateMiddleware(self.wsgi)
