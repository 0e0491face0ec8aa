"""Key activation between real KMEs over mutual TLS on 127.0.0.1."""
import base64

import pytest
import requests

from kme.errors import KEYS_NOT_FOUND
from tests.network import Network


@pytest.fixture(scope="module")
def network(tmp_path_factory, pki):
    network = Network(tmp_path_factory.mktemp("two"), pki, [(1, 2)])
    network.write_link_file(1, 2, "link-a.cor", 400)
    network.write_link_file(1, 2, "link-b.cor", 400)
    network.start_all()
    network.wait_for_link(1, 2, 800)
    yield network
    network.stop_all()


def fetch(kme, sae_id, master_id, keys, post=True):
    session = kme.sae(sae_id)
    url = f"{kme.url()}/keys/{master_id}/dec_keys"
    if post:
        return session.post(url, json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}, timeout=10)
    return session.get(url, params={"key_ID": keys[0]["key_ID"]}, timeout=10)


def test_pool_is_split_between_the_two_directions(network):
    one, two = network[1].ledger.assert_exact(2), network[2].ledger.assert_exact(1)
    assert one["available"] + one["peer_held"] == 800
    assert one["available"] == two["peer_held"] and one["peer_held"] == two["available"]


def test_remote_exchange_get_and_post_with_size_over_256(network):
    kme1, kme2 = network[1], network[2]
    master = kme1.sae(1)
    before = master.get(f"{kme1.url()}/keys/3/status", timeout=10).json()
    assert (before["source_KME_ID"], before["target_KME_ID"]) == ("1", "2")
    by_get = master.get(f"{kme1.url()}/keys/3/enc_keys?number=3&size=512", timeout=10).json()["keys"]
    by_post = master.post(f"{kme1.url()}/keys/3/enc_keys", json={"number": 2, "size": 1024}, timeout=10).json()["keys"]
    assert [len(base64.b64decode(k["key"])) for k in by_get + by_post] == [64, 64, 64, 128, 128]
    after = master.get(f"{kme1.url()}/keys/3/status", timeout=10).json()
    assert after["stored_key_count"] == before["stored_key_count"] - (3 * 2 + 2 * 4)

    assert fetch(kme2, 3, 1, by_get).json()["keys"] == by_get
    for key in by_post:
        assert fetch(kme2, 3, 1, [key], post=False).json()["keys"] == [key]
    again = fetch(kme2, 3, 1, by_get[:1])
    assert again.status_code == 400 and again.json() == {"message": KEYS_NOT_FOUND}
    assert kme2.ledger.waiting() == 0
    kme1.ledger.assert_exact(2)
    kme2.ledger.assert_exact(1)


def test_both_directions_and_events(network):
    kme1, kme2 = network[1], network[2]
    from_two = kme2.sae(3).get(f"{kme2.url()}/keys/1/enc_keys", timeout=10).json()["keys"]
    assert fetch(kme1, 1, 3, from_two).json()["keys"] == from_two
    messages = [m for (m,) in kme2.ledger._query("SELECT message FROM events ORDER BY id")]
    assert "SAE 3 requested a key to communicate with 1" in messages
    assert "As SAE 1 belongs to KME 1, activating it through inter KMEs network" in messages
    assert f"Key {from_two[0]['key_ID']} activated between SAEs 3 and 1" in messages
    received = [m for (m,) in kme1.ledger._query("SELECT message FROM events ORDER BY id")]
    assert f"SAE 1 requested key {from_two[0]['key_ID']} (from 3)" in received


def test_multicast_to_two_slaves_at_the_peer(network):
    kme1, kme2 = network[1], network[2]
    keys = kme1.sae(1).post(f"{kme1.url()}/keys/3/enc_keys",
                            json={"number": 2, "additional_slave_SAE_IDs": ["4"]}, timeout=10).json()["keys"]
    assert fetch(kme2, 3, 1, keys).json()["keys"] == keys
    assert kme2.ledger.waiting() == 2
    assert fetch(kme2, 4, 1, keys).json()["keys"] == keys
    assert kme2.ledger.waiting() == 0
    # Erasing a delivered key erases its slave rows with it.
    assert kme2.ledger._query("SELECT COUNT(*) FROM key_slaves") == [(0,)]
    third = fetch(kme2, 3, 1, keys)
    assert third.status_code == 400 and third.json() == {"message": KEYS_NOT_FOUND}


def test_multicast_to_a_local_and_a_remote_slave(network):
    kme1, kme2 = network[1], network[2]
    keys = kme1.sae(1).post(f"{kme1.url()}/keys/3/enc_keys", json={"additional_slave_SAE_IDs": ["2"]},
                            timeout=10).json()["keys"]
    assert fetch(kme1, 2, 1, keys).json()["keys"] == keys
    assert fetch(kme2, 3, 1, keys).json()["keys"] == keys
    assert fetch(kme1, 2, 1, keys).status_code == 400


def test_slave_of_the_peer_that_is_not_named_is_401(network):
    kme1, kme2 = network[1], network[2]
    keys = kme1.sae(1).get(f"{kme1.url()}/keys/3/enc_keys", timeout=10).json()["keys"]
    assert fetch(kme2, 4, 1, keys).status_code == 401
    assert fetch(kme2, 3, 1, keys).json()["keys"] == keys


def test_not_enough_keys_at_the_master_takes_nothing(network):
    kme1 = network[1]
    before = kme1.ledger.assert_exact(2)
    response = kme1.sae(1).post(f"{kme1.url()}/keys/3/enc_keys", json={"number": 128, "size": 8192}, timeout=10)
    assert response.status_code == 503 and response.json()["message"].startswith("not enough key material")
    assert kme1.ledger.assert_exact(2) == before


def test_valid_kme_certificate_with_unregistered_serial_is_401(network):
    # KME 1's KME CA also issued KME 3's certificate, but KME 1 is not linked to KME 3 here.
    impostor = network.peer_client(2, 1, pfx_of=3)
    before = network[1].ledger.assert_exact(2)
    response = impostor.session.post(f"{impostor.base}/activations", json={}, timeout=10)
    assert response.status_code == 401 and response.headers["Content-Type"] == "application/json"
    assert network[1].ledger.assert_exact(2) == before


def test_sae_certificate_cannot_reach_the_kme_interface(network):
    session = network[1].sae(1)
    with pytest.raises(requests.exceptions.RequestException):
        session.post(f"https://127.0.0.1:{network[1].port('kmes_https_interface')}/api/v1/kme/activations",
                     json={}, timeout=10)
