"""What a failed call to a peer proves, against misbehaving TLS peers on 127.0.0.1 (no KME runs).

Only a failure before the first byte of the request is "unreachable" (the keys may go back to the pool);
a TLS error once the request started is an unknown outcome (the keys are held back and cancelled).
"""
import socket
import ssl
import time

import pytest

from kme.errors import PeerOutcomeUnknown, PeerUnreachable
from tests.fake_peer import FakePeer
from tests.network import Network

ACTIVATION = {"activation_ID": "0f1d4f35-54f5-4c52-9e0e-3a1f0cf3a2f1", "master_SAE_ID": 1, "slave_SAE_IDs": [3],
              "size": 256, "keys": [{"key_ID": "9b0f64a5-0a4e-4a5e-8f3c-0b1f3f5a6c7d",
                                     "parts": [{"file": "link.cor", "position": 0}]}]}
# About 20 kB, as a large activation or relay is: it is all written before any answer is read.
LARGE = dict(ACTIVATION, padding="x" * 20_000)


@pytest.fixture
def network(tmp_path, pki):
    return Network(tmp_path, pki, [(1, 2)])


def fake_kme_2(network, mode, trusted=True):
    """A fake KME 2 with its own server certificate, or (not ``trusted``) one no KME trusts: SAE 3's."""
    folder = network.pki.folder / "kme2"
    cert, key = ((str(folder / "kme_server.crt"), str(folder / "kme_server.key")) if trusted
                 else network.pki.client(2, 3))
    return FakePeer(network[2].port("kmes_https_interface"), cert, key, mode,
                    untrusted_ca=str(folder / "ca_saes.crt"))


def test_a_corrupted_answer_after_the_request_is_an_unknown_outcome(network):
    peer = fake_kme_2(network, "corrupt")
    try:
        with pytest.raises(PeerOutcomeUnknown, match="KME 2 broke TLS after the request was sent"):
            network.peer_client(1, 2).activate(ACTIVATION)
        assert peer.activation_received.is_set()
    finally:
        peer.close()


def test_a_tls_1_3_peer_refusing_our_certificate_after_the_request_left_is_an_unknown_outcome(network):
    peer = fake_kme_2(network, "refuse_certificate")
    try:
        with pytest.raises(PeerOutcomeUnknown, match="KME 2 broke TLS after the request was sent"):
            network.peer_client(1, 2).activate(LARGE)
        assert peer.refused.wait(10)
        # The request reached the peer's socket before we learned of the refusal.
        assert peer.bytes_after_refusal > 20_000
    finally:
        peer.close()


@pytest.mark.parametrize("mode, trusted", [
    # TLS 1.2: the peer refuses our certificate within the handshake, before we write a byte of the request.
    ("refuse_certificate_tls12", True),
    # A server certificate we do not trust: we end the handshake ourselves.
    ("hang", False),
])
def test_a_handshake_that_fails_before_the_request_is_unreachable(network, mode, trusted):
    peer = fake_kme_2(network, mode, trusted)
    try:
        with pytest.raises(PeerUnreachable, match=r"KME 2 could not be reached \(SSLError\)"):
            network.peer_client(1, 2).activate(LARGE)
        assert not peer.activation_received.is_set()
        if mode.startswith("refuse"):
            # The rest of our handshake flight only: the 20 kB request never left.
            assert peer.refused.wait(10) and peer.bytes_after_refusal < 2_000
    finally:
        peer.close()


def test_a_refused_connection_is_unreachable(network):
    with pytest.raises(PeerUnreachable, match=r"KME 2 could not be reached \(connection refused\)"):
        network.peer_client(1, 2).activate(ACTIVATION)


def test_a_deadline_cuts_the_wait_for_the_answer(network):
    """The read timeout of a call is what is left until its request's deadline (the network's peers wait 2 s)."""
    peer = fake_kme_2(network, "hang")
    try:
        with pytest.raises(PeerOutcomeUnknown, match=r"KME 2 did not answer within 0\.[0-5] s"):
            network.peer_client(1, 2).activate(ACTIVATION, time.monotonic() + 0.5)
        assert peer.activation_received.is_set()
    finally:
        peer.close()


def test_a_call_whose_deadline_passed_is_not_made(network):
    peer = fake_kme_2(network, "hang")
    try:
        with pytest.raises(PeerUnreachable, match="KME 2 was not called: the request's time ran out before"):
            network.peer_client(1, 2).activate(ACTIVATION, time.monotonic())
        assert not peer.request_received.is_set()
    finally:
        peer.close()


def test_the_fake_peer_closed_while_a_refusal_drains_ends_quietly(network):
    """The fake peer's close() may close a refused connection before its handler drains it (a test that ended
    first): the handler ends without an error of its own (it failed a test at random in a handler thread)."""
    peer = fake_kme_2(network, "refuse_certificate")
    try:
        closed = ssl.create_default_context().wrap_socket(socket.socket(), server_hostname="127.0.0.1",
                                                         do_handshake_on_connect=False)
        closed.close()
        peer._drain_refused(closed)
        assert peer.refused.is_set()
    finally:
        peer.close()
