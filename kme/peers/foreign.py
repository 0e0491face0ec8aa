"""HTTPS client towards a foreign KMS's ETSI GS QKD 020 interface (requests, mutual TLS): keys we pass it
(ext_keys), and the acknowledgements we owe it, at the ``ack_callback_url`` its requests named.

Our client certificate comes from the foreign KMS's entry in the
configuration, its server certificate is checked against the CA named
there; proxies are never used (both systems sit in one trusted node).
Every failure is one ForeignKmsFailure whose message says how, in a few
words: the caller retries.
"""
import requests

from kme.config import ForeignKms
from kme.errors import ForeignKmsFailure
from kme.peers.client import cached_client, context_adapter


class ForeignClient:
    """Calls to one foreign KMS."""

    def __init__(self, foreign: ForeignKms):
        self.foreign = foreign
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.mount("https://", context_adapter(foreign))

    def pass_keys(self, container: str, timeout: float) -> None:
        """POST an extended key request container (JSON) to its ext_keys, waiting at most ``timeout`` seconds in
        all; ForeignKmsFailure unless it answers with a 2xx status (202, as the draft has it)."""
        self._post(f"{self.foreign.base_url}/ext_keys", container, timeout)

    def acknowledge(self, url: str, body: str) -> None:
        """POST acknowledgement containers (``body``: their JSON array) to ``url``; ForeignKmsFailure unless it
        answers with a 2xx status."""
        self._post(url, body, None)

    def _post(self, url: str, body: str, total: float | None) -> None:
        name = f"foreign KMS {self.foreign.id}"
        connect, read = self.foreign.connect_timeout_seconds, self.foreign.read_timeout_seconds
        try:
            response = self.session.post(url, data=body.encode(), headers={"Content-Type": "application/json"},
                                         timeout=(connect, read) if total is None
                                         else (min(connect, total), min(read, total)))
        except requests.exceptions.Timeout:
            raise ForeignKmsFailure(f"{name} did not answer in time") from None
        except requests.exceptions.SSLError:
            raise ForeignKmsFailure(f"{name}: TLS failed (certificate or handshake)") from None
        except requests.exceptions.RequestException as exc:
            raise ForeignKmsFailure(f"{name} could not be reached ({exc.__class__.__name__})") from None
        if not 200 <= response.status_code < 300:
            raise ForeignKmsFailure(f"{name} answered HTTP {response.status_code}")


def foreign_client(foreign: ForeignKms) -> ForeignClient:
    """The client of ``foreign`` for this process."""
    return cached_client(("foreign", foreign.id), lambda: ForeignClient(foreign))
