"""The peer-certificate middleware and the serial lookup."""
import ssl
from pathlib import Path

import pytest
from kme.interfaces.identity import PeerCertificateMiddleware, client_serial, peer_certificate_keys

pytestmark = pytest.mark.engine_independent


class FakeTlsSocket(ssl.SSLSocket):
    """Stands in for a TLS socket; only getpeercert is used."""

    def __init__(self, der, info):  # noqa: super().__init__ is not wanted for a fake
        self._der, self._info = der, info

    def getpeercert(self, binary_form=False):
        self.reads = getattr(self, "reads", 0) + 1
        return self._der if binary_form else self._info


def run_middleware(environ):
    seen = {}

    def app(env, start_response):
        seen.update(env)
        return []

    PeerCertificateMiddleware(app)(environ, None)
    return seen


def test_plain_socket_gives_no_identity():
    assert peer_certificate_keys(object()) == {"SSL_CLIENT_VERIFY": "NONE"}


def test_unverified_certificate_gives_no_identity():
    assert peer_certificate_keys(FakeTlsSocket(b"\x30\x00", {}))["SSL_CLIENT_VERIFY"] == "NONE"
    assert peer_certificate_keys(FakeTlsSocket(None, None))["SSL_CLIENT_VERIFY"] == "NONE"


def test_a_connections_certificate_is_read_once_and_replaces_forged_keys_on_every_request():
    sock = FakeTlsSocket(b"\x30\x00", {"serialNumber": "0A", "subject": ((("commonName", "sae1"),),)})
    seen = []
    middleware = PeerCertificateMiddleware(lambda env, start_response: seen.append(dict(env)) or [])
    for forged in ({}, {"SSL_CLIENT_M_SERIAL": "FF", "SSL_CLIENT_S_DN": "CN=forged"}):
        middleware({"gunicorn.socket": sock, **forged}, None)
    assert [(env["SSL_CLIENT_M_SERIAL"], env["SSL_CLIENT_S_DN"]) for env in seen] == [("0A", "commonName=sae1")] * 2
    assert sock.reads == 2  # one handshake's certificate: its DER and its decoded form, once


def test_forged_environ_keys_are_replaced():
    seen = run_middleware({"SSL_CLIENT_VERIFY": "SUCCESS", "SSL_CLIENT_M_SERIAL": "01", "gunicorn.socket": object()})
    assert seen["SSL_CLIENT_VERIFY"] == "NONE"
    assert "SSL_CLIENT_M_SERIAL" not in seen
    assert client_serial(seen) is None


def test_verified_certificate_fills_mod_ssl_keys(pki):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(Path(pki.client(1, 1)[0]).read_bytes())
    info = {"serialNumber": format(cert.serial_number, "X"), "subject": ((("commonName", "SAE 1"),),)}
    seen = run_middleware({"gunicorn.socket": FakeTlsSocket(cert.public_bytes(Encoding.DER), info)})
    assert seen["SSL_CLIENT_VERIFY"] == "SUCCESS"
    assert seen["SSL_CLIENT_S_DN"] == "commonName=SAE 1"
    assert seen["SSL_CLIENT_CERT"].startswith("-----BEGIN CERTIFICATE-----")
    assert client_serial(seen) == cert.serial_number == int.from_bytes(bytes(pki.serials["sae1"]), "big")
