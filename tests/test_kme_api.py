"""The inter-KME interface: who may activate what, idempotence, three KMEs."""
import base64
import uuid

import pytest

from kme.interfaces.peer_client import PeerRefused
from tests.network import Network


@pytest.fixture(scope="module")
def network(tmp_path_factory, pki):
    network = Network(tmp_path_factory.mktemp("three"), pki, [(1, 2), (1, 3)])
    network.write_link_file(1, 2, "l12.cor", 100)
    network.write_link_file(1, 3, "l13.cor", 100)
    network.start_all()
    network.wait_for_link(1, 2, 100)
    network.wait_for_link(1, 3, 100)
    yield network
    network.stop_all()


def activation(master: int, slaves: list[int], parts: list[tuple[str, int]], size=256) -> dict:
    return {"activation_ID": str(uuid.uuid4()), "master_SAE_ID": master, "slave_SAE_IDs": slaves, "size": size,
            "keys": [{"key_ID": str(uuid.uuid4()), "parts": [{"file": f, "position": p} for f, p in parts]}]}


def test_exchanges_on_both_links(network):
    kme1 = network[1]
    for slave, kme in ((3, 2), (5, 3)):
        keys = kme1.sae(1).get(f"{kme1.url()}/keys/{slave}/enc_keys?number=2", timeout=10).json()["keys"]
        fetched = network[kme].sae(slave).post(f"{network[kme].url()}/keys/1/dec_keys",
                                               json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}, timeout=10)
        assert fetched.json()["keys"] == keys
    back = network[3].sae(5).get(f"{network[3].url()}/keys/2/enc_keys", timeout=10).json()["keys"]
    assert kme1.sae(2).get(f"{kme1.url()}/keys/5/dec_keys", params={"key_ID": back[0]["key_ID"]},
                           timeout=10).json()["keys"] == back


def test_slaves_behind_two_other_kmes_are_a_clear_400(network):
    kme1 = network[1]
    response = kme1.sae(1).post(f"{kme1.url()}/keys/3/enc_keys", json={"additional_slave_SAE_IDs": ["5"]},
                                timeout=10)
    assert response.status_code == 400 and "relaying" in response.json()["message"]


def refused(network, call, kme_id=1, link=3):
    """Run a refused call and check that it changed nothing at KME ``kme_id``."""
    before = network[kme_id].ledger.assert_exact(link), network[kme_id].ledger.waiting()
    with pytest.raises(PeerRefused) as caught:
        call()
    assert (network[kme_id].ledger.assert_exact(link), network[kme_id].ledger.waiting()) == before
    return caught.value.detail


def test_kme3_cannot_activate_keys_of_link_1_2(network):
    kme3_to_1 = network.peer_client(3, 1)
    # Keys KME 1 lent to KME 2's direction of link 1-2; KME 3 names them as its own.
    lent = network.peer_client(2, 1).lease({"lease_ID": str(uuid.uuid4()), "minimum": 1, "wanted": 1})["runs"][0]
    before = network[1].ledger.assert_exact(2)
    message = refused(network, lambda: kme3_to_1.activate(activation(5, [1], [(lent["file"], lent["first"])])))
    assert "not available" in message
    assert network[1].ledger.assert_exact(2) == before


def test_kme3_cannot_act_for_an_sae_of_kme2(network):
    message = refused(network, lambda: network.peer_client(3, 1).activate(activation(3, [1], [("l13.cor", 1)])))
    assert "SAE 3 is not an SAE of KME 3" in message


def test_slaves_must_be_ours(network):
    message = refused(network, lambda: network.peer_client(3, 1).activate(activation(5, [4], [("l13.cor", 1)])))
    assert "SAE 4 is not an SAE of this KME" in message


def test_keys_of_the_callers_own_direction_only(network):
    # KME 1 arbitrates link 1-3: what it did not lend is its own direction, which KME 3 may not activate.
    message = refused(network, lambda: network.peer_client(3, 1).activate(activation(5, [1], [("l13.cor", 2)])))
    assert "not available" in message


def test_a_certificate_of_another_kme_is_that_kme(network):
    # KME 2's certificate towards KME 1, used from KME 3's side: KME 1 sees KME 2, not KME 3.
    impostor = network.peer_client(3, 1, pfx_of=2)
    message = refused(network, lambda: impostor.activate(activation(5, [1], [("l13.cor", 1)])))
    assert "SAE 5 is not an SAE of KME 2" in message


def borrowed_position(network) -> tuple[str, int]:
    """A key KME 1 lends to KME 3's direction of link 1-3 (asked directly: KME 3's own store does not know)."""
    run = network.peer_client(3, 1).lease({"lease_ID": str(uuid.uuid4()), "minimum": 1, "wanted": 1})["runs"][0]
    return run["file"], run["first"]


def test_a_lease_is_idempotent_and_lends_only_what_is_free(network):
    to_kme1 = network.peer_client(3, 1)
    request = {"lease_ID": str(uuid.uuid4()), "minimum": 2, "wanted": 3}
    first = to_kme1.lease(request)
    assert sum(run["count"] for run in first["runs"]) == 3
    assert to_kme1.lease(request) == first
    free = network[1].ledger.link(3)["available"]
    nothing = to_kme1.lease({"lease_ID": str(uuid.uuid4()), "minimum": free + 1, "wanted": free + 1})
    assert nothing == {"lease_ID": nothing["lease_ID"], "runs": [], "free": free}
    network[1].ledger.assert_exact(3)


def test_activation_is_idempotent_and_cancel_too(network):
    kme1 = network[1]
    request = activation(5, [1, 2], [borrowed_position(network)])
    to_kme1 = network.peer_client(3, 1)
    to_kme1.activate(request)
    after_first = kme1.ledger.assert_exact(3), kme1.ledger.waiting()
    to_kme1.activate(request)
    assert (kme1.ledger.assert_exact(3), kme1.ledger.waiting()) == after_first
    key_id = request["keys"][0]["key_ID"]
    got = kme1.sae(1).get(f"{kme1.url()}/keys/5/dec_keys", params={"key_ID": key_id}, timeout=10).json()["keys"]
    assert len(base64.b64decode(got[0]["key"])) == 32
    to_kme1.cancel(request)
    to_kme1.cancel(request)
    # Cancelled: the other slave can no longer fetch it, and a replay is refused.
    assert kme1.sae(2).get(f"{kme1.url()}/keys/5/dec_keys", params={"key_ID": key_id}, timeout=10).status_code == 400
    assert "cancelled" in refused(network, lambda: to_kme1.activate(request))


@pytest.mark.parametrize("body, fragment", [
    ({"activation_ID": "x"}, "activation_ID: not a UUID"),
    ({**activation(5, [1], [("l13.cor", 5)]), "extra": 1}, "extra: unknown field"),
    (activation(5, [1], [("l13.cor", 5), ("l13.cor", 7)]), "parts"),
    (activation(5, [1], [("l13.cor", 5)], size=12), "size 12"),
    # No file system names a file so; PostgreSQL's text could not even hold it.
    (activation(5, [1], [("l13\x00.cor", 5)]), "file: not a file name"),
])
def test_malformed_activations_are_400(network, body, fragment):
    to_kme1 = network.peer_client(3, 1)
    response = to_kme1.session.post(f"{to_kme1.base}/activations", json=body, timeout=10)
    assert response.status_code == 400 and fragment in response.json()["message"]


def test_json_nested_beyond_the_recursion_limit_is_400(network):
    to_kme1 = network.peer_client(3, 1)
    before = network[1].ledger.assert_exact(3)
    response = to_kme1.session.post(f"{to_kme1.base}/activations", data=b"[" * 30_000 + b"]" * 30_000,
                                    headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400 and response.json() == {"message": "the request body is not valid JSON"}
    assert network[1].ledger.assert_exact(3) == before


def test_a_peers_own_words_go_to_the_log_not_to_the_sae(network):
    kme1 = network[1]
    # KME 3 lost the keys it held for KME 1's direction (damaged storage): it refuses with its own message.
    network[3].ledger.write(("DELETE FROM pool_keys WHERE link_id = 1 AND state = 1",))
    response = kme1.sae(1).post(f"{kme1.url()}/keys/5/enc_keys", json={"number": 1}, timeout=10)
    assert response.status_code == 503
    assert response.json() == {"message": "KME 3 refused the request (HTTP 409)"}
    assert "not available on this KME" in kme1.processes["sae"].output()
