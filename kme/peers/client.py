"""HTTPS client towards the inter-KME interface of peer KMEs (requests, mutual TLS).

One session per peer per process keeps connections alive. Our client
certificate comes from the configured PKCS#12 file; the peer's server
certificate is checked against ``server_ca_cert_path`` or the system trust
store, never skipped. Failures are sorted by what they prove:
PeerUnreachable and PeerRefused mean the peer changed nothing;
PeerOutcomeUnknown means it may have. A failure is "unreachable" only when
no byte of the request can have been written: the connection marks the
moment it starts writing, and any failure after it (a TLS alert or a
corrupted record included) is an unknown outcome.
"""
import base64
import logging
import os
import ssl
import tempfile
import threading
import time

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from marshmallow import ValidationError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError
from urllib3.util import Timeout

from kme.config import ForeignKms, OtherKme
from kme.errors import PeerOutcomeUnknown, PeerRefused, PeerUnreachable
from kme.peers.wire import (
    RELAY_MAC_HEADER,
    LeaseAnswerSchema,
    LeaseStatesAnswerSchema,
    ProgressAnswerSchema,
    StreamChunkAnswerSchema,
    StreamOpenAnswerSchema,
)

_LEASE_ANSWER, _PROGRESS_ANSWER = LeaseAnswerSchema(), ProgressAnswerSchema()
_LEASE_STATES_ANSWER = LeaseStatesAnswerSchema()
_STREAM_OPEN_ANSWER, _STREAM_CHUNK_ANSWER = StreamOpenAnswerSchema(), StreamChunkAnswerSchema()

log = logging.getLogger(__name__)


def client_context(peer: OtherKme | ForeignKms) -> ssl.SSLContext:
    """TLS client context: our certificate from the .pfx, the peer (a KME or a foreign KMS) checked against its CA
    or the system's."""
    context = ssl.create_default_context(cafile=str(peer.server_ca_cert_path) if peer.server_ca_cert_path else None)
    if peer.server_ca_cert_path is None and os.environ.get("REQUESTS_CA_BUNDLE"):
        context.load_verify_locations(cafile=os.environ["REQUESTS_CA_BUNDLE"])
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    key, certificate, chain = pkcs12.load_key_and_certificates(
        peer.https_client_authentication_certificate.read_bytes(),
        peer.https_client_authentication_certificate_password.encode())
    # load_cert_chain reads files only: a private folder, deleted at once.
    with tempfile.TemporaryDirectory(prefix="kme-peer-") as folder:
        path = os.path.join(folder, "client.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
            for cert in [certificate, *(chain or [])]:
                handle.write(cert.public_bytes(serialization.Encoding.PEM))
        context.load_cert_chain(path)
    return context


_writing = threading.local()


class _MarkingConnection(HTTPSConnection):
    """Records, for the calling thread, that a request's bytes may be on the wire from now on.

    The TLS handshake happens before ``request`` (urllib3 connects in
    ``_validate_conn``); with TLS 1.3 the server checks our certificate only
    after we finished, so its refusal arrives once the request left.
    """

    def request(self, *args, **kwargs):
        _writing.started = True
        return super().request(*args, **kwargs)


class _MarkingPool(HTTPSConnectionPool):
    ConnectionCls = _MarkingConnection


class _ContextAdapter(HTTPAdapter):
    """Uses our SSL context for every connection; trust comes from it alone."""

    def __init__(self, context: ssl.SSLContext):
        self._context = context
        super().__init__(pool_connections=1, pool_maxsize=16, max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {**self.poolmanager.pool_classes_by_scheme, "https": _MarkingPool}

    def proxy_manager_for(self, proxy, **kwargs):
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **kwargs)

    def cert_verify(self, conn, url, verify, cert):
        conn.cert_reqs = "CERT_REQUIRED"

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        return super().build_connection_pool_key_attributes(request, True, cert)


def context_adapter(peer: OtherKme | ForeignKms) -> HTTPAdapter:
    """A requests adapter whose connections use ``client_context(peer)``, and trust nothing else."""
    return _ContextAdapter(client_context(peer))


class PeerClient:
    """Calls to one peer KME's inter-KME interface."""

    def __init__(self, peer: OtherKme):
        self.peer = peer
        self.base = f"https://{peer.inter_kme_bind_address}/api/v1/kme"
        self.session = requests.Session()
        self.session.trust_env = not peer.ignore_system_proxy_settings
        self.session.mount("https://", context_adapter(peer))

    def probe(self) -> tuple[bool, str]:
        """Whether the peer's inter-KME interface answers, and its health or the failure."""
        url = f"https://{self.peer.inter_kme_bind_address}/healthz"
        try:
            response = self.session.get(url, timeout=(self.peer.connect_timeout_seconds,
                                                      self.peer.read_timeout_seconds))
        except requests.exceptions.RequestException as exc:
            return False, f"unreachable ({exc.__class__.__name__})"
        try:
            status = response.json().get("status", "no status")
        except (ValueError, AttributeError):
            status = "no valid JSON"
        return True, f"HTTP {response.status_code}, {status}"

    def activate(self, request: dict, deadline: float | None = None) -> None:
        """Ask the peer to activate keys; returns only once it confirmed."""
        self._post("/activations", request, "activation_ID", request["activation_ID"], deadline=deadline)

    def cancel(self, request: dict) -> None:
        """Make sure the peer never activates, or erases, the keys of an activation."""
        activation_id = request["activation_ID"]
        self._post(f"/activations/{activation_id}/cancel", request, "activation_ID", activation_id)

    def relay(self, activation_id: str, body: bytes, mac: bytes, deadline: float) -> dict:
        """Pass a relay hop on (``body``: the JSON bytes the one-time ``mac`` authenticates); its answer once the
        peer and every hop after it committed."""
        return self._post("/relays", body, "activation_ID", activation_id, deadline=deadline,
                          headers={"Content-Type": "application/json", RELAY_MAC_HEADER: base64.b64encode(mac)})

    def cancel_relay(self, request: dict) -> None:
        """Make sure a relay hop never takes effect at the peer, nor at any hop after it."""
        self._post(f"/relays/{request['activation_ID']}/cancel", request, "activation_ID", request["activation_ID"])

    def release_relay(self, request: dict) -> None:
        """Let the slaves of a decided multicast relay fetch its keys, at the peer and every hop after it."""
        self._post(f"/relays/{request['activation_ID']}/release", request, "activation_ID", request["activation_ID"])

    def lease(self, request: dict, deadline: float | None = None) -> dict:
        """Ask the peer to lend keys of its direction to ours; its answer (runs of positions, its free keys)."""
        return self._checked(_LEASE_ANSWER, self._post("/leases", request, "lease_ID", request["lease_ID"],
                                                       deadline=deadline))

    def lease_states(self, request: dict) -> dict:
        """Ask the peer what it did with leases we gave it; its answer."""
        return self._checked(_LEASE_STATES_ANSWER, self._post("/leases/states", request, "database_ID", None))

    def exchange_progress(self, push: dict) -> dict:
        """Tell the peer our ingestion progress; its answer carries its own."""
        return self._checked(_PROGRESS_ANSWER, self._post("/progress", push, "database_ID", None))

    def stream_open(self, request: dict, deadline: float) -> dict:
        """Tell the master's KME that the slave SAE opened its end of a stream; the stream as it has it."""
        return self._checked(_STREAM_OPEN_ANSWER, self._post("/streams/open", request, "KSID", request["KSID"],
                                                             deadline=deadline))

    def stream_chunk(self, request: dict, deadline: float) -> dict:
        """Ask the master's KME for a chunk of a stream; its answer once the chunk is activated here, or why not."""
        return self._checked(_STREAM_CHUNK_ANSWER, self._post("/streams/chunks", request, "KSID", request["KSID"],
                                                              deadline=deadline))

    def stream_close(self, request: dict, deadline: float) -> None:
        """Tell the KME of the stream's other end that it is closed."""
        self._post("/streams/close", request, "KSID", request["KSID"], deadline=deadline)

    def _checked(self, schema, answer: dict) -> dict:
        try:
            return schema.load(answer)
        except ValidationError:
            raise PeerOutcomeUnknown(f"KME {self.peer.id} answered with an invalid body") from None

    def _timeout(self, deadline: float | None) -> Timeout:
        """The peer's connect and read timeouts, cut to what is left until ``deadline`` (time.monotonic()) and
        with that as their total; PeerUnreachable, before anything is sent, when nothing is left."""
        connect, read = self.peer.connect_timeout_seconds, self.peer.read_timeout_seconds
        if deadline is None:
            return Timeout(connect=connect, read=read)
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerUnreachable(f"KME {self.peer.id} was not called: the request's time ran out before")
        return Timeout(connect=min(connect, left), read=min(read, left), total=left)

    def _post(self, path: str, body: dict | bytes, id_field: str, expected_id: str | None,
              deadline: float | None = None, headers: dict | None = None) -> dict:
        """POST ``body`` (an object, or JSON bytes sent as they are) with every wait over by ``deadline``; the
        answer, whose ``id_field`` must be a string, equal to ``expected_id`` unless that is None."""
        name = f"KME {self.peer.id}"
        timeout = self._timeout(deadline)
        _writing.started = False
        try:
            response = self.session.post(self.base + path, **({"data": body} if isinstance(body, bytes)
                                                               else {"json": body}),
                                         headers=headers, timeout=timeout)
        except requests.exceptions.RequestException as exc:
            if not _writing.started:
                # Refused, timed out or failed before the request: not one byte of it left.
                raise PeerUnreachable(f"{name} could not be reached ({_unreachable_reason(exc)})") from None
            if isinstance(exc, requests.exceptions.Timeout):
                raise PeerOutcomeUnknown(f"{name} did not answer within {timeout.read_timeout:.1f} s") from None
            if isinstance(exc, requests.exceptions.SSLError):
                raise PeerOutcomeUnknown(f"{name} broke TLS after the request was sent") from None
            if isinstance(exc, requests.exceptions.ConnectionError):
                raise PeerOutcomeUnknown(f"{name} dropped the connection before answering") from None
            # The answer broke off or could not be decoded (e.g. a peer dying after its headers).
            raise PeerOutcomeUnknown(f"{name} sent a broken answer ({exc.__class__.__name__})") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise PeerOutcomeUnknown(f"{name} answered HTTP {response.status_code} without a valid JSON body")
        if response.status_code != 200:
            if isinstance(answer.get("message"), str):
                raise PeerRefused(f"{name} refused the request (HTTP {response.status_code})", answer["message"],
                                  response.status_code, _relay_failure(answer))
            raise PeerOutcomeUnknown(f"{name} answered HTTP {response.status_code} with an unknown body")
        if not isinstance(answer.get(id_field), str) or (expected_id is not None and answer[id_field] != expected_id):
            raise PeerOutcomeUnknown(f"{name} answered with an unexpected body")
        return answer


def _unreachable_reason(exc: requests.exceptions.RequestException) -> str:
    """What kept the connection from being made, in a few words."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(reason, NewConnectionError) and not isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection refused"
    return exc.__class__.__name__


def _relay_failure(answer: dict) -> dict | None:
    """The ``relay_failure`` object of an error answer's details, if any."""
    details = answer.get("details")
    if isinstance(details, list):
        for detail in details:
            if isinstance(detail, dict) and isinstance(detail.get("relay_failure"), dict):
                return detail["relay_failure"]
    return None


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def cached_client(key: tuple, make):
    """The client ``make()`` built for ``key`` in this process (on first use; never inherited across fork, where
    its connections would be shared with the parent)."""
    full = (os.getpid(), *key)
    with _clients_lock:
        if full not in _clients:
            _clients[full] = make()
        return _clients[full]


def client_for(peer: OtherKme) -> PeerClient:
    """The client of ``peer`` for this process."""
    return cached_client(("kme", peer.id), lambda: PeerClient(peer))
