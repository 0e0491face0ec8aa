"""Inter-KME failures: peer down, hanging, garbage, refusing; master killed mid-activation."""
import base64
import json
import threading
import time

import pytest
import requests

from tests.fake_peer import FakePeer
from tests.network import Network
from tests.support import kill_family, wait_until

READ_TIMEOUT = 2
CONNECT_TIMEOUT = 1


@pytest.fixture
def network(tmp_path, pki):
    network = Network(tmp_path, pki, [(1, 2)], workers=1)
    network.write_link_file(1, 2, "link.cor", 200)
    network.start_all()
    network.wait_for_link(1, 2, 200)
    yield network
    network.stop_all()


def enc_keys(network, number=2, timeout=CONNECT_TIMEOUT + READ_TIMEOUT + 3):
    return network[1].sae(1).post(f"{network[1].url()}/keys/3/enc_keys", json={"number": number}, timeout=timeout)


def fake_peer(network, mode):
    kme2 = network[2]
    certs = network.pki.folder / "kme2"
    return FakePeer(kme2.port("kmes_https_interface"), str(certs / "kme_server.crt"), str(certs / "kme_server.key"),
                    mode, untrusted_ca=str(certs / "ca_saes.crt"))


def reserved_material(ledger) -> set[bytes]:
    return {material for _position, material in ledger.pool_keys("state = 2")}


def assert_never_handed_out(network, held: set[bytes], rounds=5):
    """Exchanges work again, and none of them hands out a key that was held back."""
    for _ in range(rounds):
        response = enc_keys(network, number=3)
        assert response.status_code == 200, response.text
        for key in response.json()["keys"]:
            assert base64.b64decode(key["key"]) not in held


@pytest.mark.one_engine
def test_peer_interface_stopped_gives_503_and_returns_the_keys(network):
    kme1 = network[1]
    network[2].stop("kme")
    before = kme1.ledger.assert_exact(2)
    response = enc_keys(network)
    assert response.status_code == 503
    assert "KME 2" in response.json()["message"] and "reached" in response.json()["message"]
    assert kme1.ledger.assert_exact(2) == before
    network[2].start("kme")
    assert enc_keys(network).status_code == 200


@pytest.mark.one_engine
def test_peer_refusing_gives_503_and_returns_the_keys(network):
    kme1, kme2 = network[1], network[2]
    # KME 2 accepts smaller keys than KME 1: it refuses the activation, which changed nothing there.
    raw = json.loads(kme2.config.read_text())
    raw["this_kme"]["limits"] = {"max_key_size": 512}
    kme2.config.write_text(json.dumps(raw))
    kme2.stop("kme")
    kme2.start("kme")
    before = kme1.ledger.assert_exact(2)
    response = kme1.sae(1).post(f"{kme1.url()}/keys/3/enc_keys", json={"size": 1024}, timeout=10)
    assert response.status_code == 503 and response.json() == {"message": "KME 2 refused the request (HTTP 400)"}
    assert kme1.ledger.assert_exact(2) == before


def lose_keys(kme, link: int, positions: int) -> None:
    """Erase the first positions of the link's keys from a KME's database (damaged storage), counters kept exact."""
    # The first positions are those lost: the counters change by as many.
    lost, _ = kme.ledger.write(("DELETE FROM pool_keys WHERE link_id = ? AND state = 1 AND position < ?", link,
                                positions),
                               ("UPDATE links SET peer_held = peer_held - ?, discarded = discarded + ? "
                                "WHERE peer_kme_id = ?", positions, positions, link))
    assert lost == positions


@pytest.mark.one_engine
def test_keys_the_peer_no_longer_holds_are_set_aside_and_the_link_serves_on(network):
    kme1, kme2 = network[1], network[2]
    lose_keys(kme2, 1, 10)
    refused = enc_keys(network, number=10)
    assert refused.status_code == 503 and refused.json() == {"message": "KME 2 refused the request (HTTP 409)"}
    # Never claimed again: cancelled at both ends and discarded by the background worker.
    wait_until(lambda: kme1.ledger.link(2)["reserved"] == 0, timeout=30)
    assert kme1.ledger.assert_exact(2)["discarded"] == 10
    kme2.ledger.assert_exact(1)
    for _ in range(5):
        assert enc_keys(network, number=10).status_code == 200
    assert kme1.ledger.link(2)["delivered"] == kme2.ledger.link(1)["delivered"] == 50


@pytest.mark.one_engine
@pytest.mark.parametrize("mode", [
    "hang", "garbage",
    # TLS broken once the request started: a damaged answer; a TLS 1.3 peer refusing our certificate after the
    # request left. Both differ from "hang" only in the HTTP client.
    "corrupt", "refuse_certificate",
])
def test_unknown_outcome_holds_keys_back_until_settled(network, mode):
    kme1, kme2 = network[1], network[2]
    kme2.stop("kme")
    peer = fake_peer(network, mode)
    try:
        response = enc_keys(network)
        assert response.status_code == 503
        assert response.headers["Content-Type"] == "application/json"
        assert "KME 2" in response.json()["message"]
        counts = kme1.ledger.assert_exact(2)
        assert counts["reserved"] == 2
        held = reserved_material(kme1.ledger)
    finally:
        peer.close()
    kme2.start("kme")
    wait_until(lambda: kme1.ledger.link(2)["reserved"] == 0, timeout=30)
    one, two = kme1.ledger.assert_exact(2), kme2.ledger.assert_exact(1)
    assert one["discarded"] == 2 and two["discarded"] == 2
    assert_never_handed_out(network, held)


@pytest.mark.one_engine
def test_a_hanging_peer_never_makes_the_kme_look_dead(network):
    """The periodic work with a peer that never answers waits out a read timeout per call (probe, progress):
    longer than the heartbeat may stay silent (3 x 0.2 s + 2 s here). The heartbeat has a thread of its own."""
    kme1 = network[1]
    network[2].stop("kme")
    peer = fake_peer(network, "hang")
    try:
        assert peer.request_received.wait(10)
        samples = []
        until = time.monotonic() + 3 * (CONNECT_TIMEOUT + READ_TIMEOUT)
        while time.monotonic() < until:
            samples.append(kme1.sae(1).get(f"{kme1.url().removesuffix('/api/v1')}/healthz",
                                           timeout=10).json()["checks"]["ingestion_worker"])
            threading.Event().wait(0.25)
    finally:
        peer.close()
        network[2].start("kme")
    assert len(samples) > 10 and set(samples) == {"ok"}, samples


def test_master_killed_between_claim_and_answer_is_settled_after_restart(network):
    kme1, kme2 = network[1], network[2]
    kme2.stop("kme")
    peer = fake_peer(network, "hang")
    errors = []

    def ask():
        try:
            enc_keys(network, timeout=30)
        except requests.RequestException as exc:
            errors.append(exc)

    caller = threading.Thread(target=ask)
    caller.start()
    try:
        assert peer.activation_received.wait(20)
        held = reserved_material(kme1.ledger)
        assert len(held) == 2
        sae = kme1.processes.pop("sae")
        kill_family(sae)
        sae.stop()
        caller.join(30)
        assert errors
    finally:
        peer.close()
    assert kme1.ledger._query("SELECT state FROM outgoing_activations") == [("sending",)]
    kme2.start("kme")
    kme1.start("sae")
    wait_until(lambda: kme1.ledger.link(2)["reserved"] == 0, timeout=30)
    assert kme1.ledger._query("SELECT COUNT(*) FROM outgoing_activations") == [(0,)]
    kme1.ledger.assert_exact(2)
    kme2.ledger.assert_exact(1)
    assert_never_handed_out(network, held)


def test_unfetched_key_expires_with_its_event(tmp_path, pki):
    network = Network(tmp_path, pki, [(1, 2)], key_expiry_seconds=1, workers=1)
    network.write_link_file(1, 2, "link.cor", 20)
    network.start_all()
    try:
        network.wait_for_link(1, 2, 20)
        key = enc_keys(network, number=1).json()["keys"][0]
        ledger = network[2].ledger
        wait_until(lambda: ledger.waiting() == 0, timeout=10)
        events = [m for (m,) in ledger._query("SELECT message FROM events")]
        assert f"Key {key['key_ID']} expired before its slave SAEs fetched it, erased" in events
        response = network[2].sae(3).get(f"{network[2].url()}/keys/1/dec_keys", params={"key_ID": key["key_ID"]},
                                         timeout=10)
        assert response.status_code == 400
        ledger.assert_exact(1)
    finally:
        network.stop_all()


@pytest.mark.one_engine
def test_a_peer_answer_that_breaks_off_is_a_503_naming_the_peer(network):
    kme1, kme2 = network[1], network[2]
    kme2.stop("kme")
    peer = fake_peer(network, "broken")
    try:
        response = enc_keys(network)
    finally:
        peer.close()
    assert response.status_code == 503 and "KME 2 sent a broken answer" in response.json()["message"]
    assert kme1.ledger.assert_exact(2)["reserved"] == 2
    assert "Traceback" not in kme1.processes["sae"].output()


@pytest.mark.one_engine
def test_a_late_confirmation_of_a_cancelled_activation_never_reaches_the_master(network):
    """The background worker cancels an activation whose answer is slower than the settle delay."""
    kme1, kme2 = network[1], network[2]
    kme2.stop("kme")
    peer = fake_peer(network, "late")
    try:
        response = enc_keys(network, timeout=60)
        peer.release_cancel.set()
        assert peer.cancel_received.is_set() and peer.activation_answered.wait(10)
        assert response.status_code == 503, response.text
        assert "after the activation was cancelled" in response.json()["message"]
        wait_until(lambda: kme1.ledger.link(2)["reserved"] == 0, timeout=30)
    finally:
        peer.release_cancel.set()
        peer.close()
    counts = kme1.ledger.assert_exact(2)
    assert (counts["delivered"], counts["discarded"]) == (0, 2)


@pytest.mark.one_engine
def test_the_peer_counts_a_cancelled_activation_as_discarded_like_the_master(network):
    kme2 = network[2]
    client = network.peer_client(1, 2)
    before = kme2.ledger.assert_exact(1)
    request = {"activation_ID": "6b0e0b2a-6a53-4bf7-9d0c-62d4b7f0d0a1", "master_SAE_ID": 1, "slave_SAE_IDs": [3],
               "size": 512, "keys": [{"key_ID": "7c490419-7d60-487f-adc1-4ddcc177c139",
                                      "parts": [{"file": "link.cor", "position": 0},
                                                {"file": "link.cor", "position": 2}]}]}
    client.activate(request)
    assert kme2.ledger.assert_exact(1)["delivered"] == before["delivered"] + 2
    client.cancel(request)
    after = kme2.ledger.assert_exact(1)
    assert (after["delivered"], after["discarded"]) == (before["delivered"], before["discarded"] + 2)
