"""One KME served by two front ends on one database, as two hosts would serve it: two SAE gunicorn masters and
two inter-KME ones of one configuration, on ports of their own, on the session's engine."""
import base64
import json
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.forwarder import Forwarder
from tests.network import Network
from tests.support import free_port, kill_family, load_json, start_kme_interface, start_sae_interface, wait_until

KEYS = 3000
ACTIVATION_ROUTE = "POST /api/v1/kme/activations 200"


@pytest.fixture
def kmes(tmp_path, pki):
    network = Network(tmp_path, pki, [(1, 2)])
    kme1 = network[1]
    # KME 2 reaches KME 1 through one address (a load balancer, here a forwarder) in front of both front ends.
    ports = {"sae_b": free_port(), "kme_b": free_port(), "address": free_port()}
    raw = load_json(network[2].config)
    raw["other_kmes"][0]["inter_kme_bind_address"] = f"127.0.0.1:{ports['address']}"
    network[2].config.write_text(json.dumps(raw))
    forwarder = Forwarder(ports["address"], kme1.port("kmes_https_interface"))
    network.write_link_file(1, 2, "link.cor", KEYS)
    (kme1.folder / "keys" / "zone.cor").write_bytes(os.urandom(32 * KEYS))
    try:
        network.start_all()
        kme1.processes["sae_b"] = start_sae_interface(kme1.config, kme1.folder / "sae_b.log", port=ports["sae_b"])
        kme1.processes["kme_b"] = start_kme_interface(kme1.config, kme1.folder / "kme_b.log", port=ports["kme_b"])
        network.wait_for_link(1, 2, KEYS)
        wait_until(lambda: kme1.ledger.link(1)["ingested"] == KEYS)
        yield network, ports, forwarder
    finally:
        forwarder.close()
        network.stop_all()


def urls(network, ports) -> dict[str, str]:
    kme1 = network[1]
    return {"a": kme1.url(), "b": f"https://127.0.0.1:{ports['sae_b']}/api/v1"}


def deliver_and_fetch(network, ports, master_via: str, slave_via: str, slave: int, number: int) -> list[dict]:
    """enc_keys by SAE 1 through one front end, dec_keys by the slave through the other; the keys."""
    base = urls(network, ports)
    given = network[1].sae(1).post(f"{base[master_via]}/keys/{slave}/enc_keys", json={"number": number},
                                   timeout=20)
    assert given.status_code == 200, given.text
    keys = given.json()["keys"]
    if slave == 2:
        fetched = network[1].sae(2).post(f"{base[slave_via]}/keys/1/dec_keys",
                                         json={"key_IDs": [{"key_ID": key["key_ID"]} for key in keys]}, timeout=20)
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["keys"] == keys
    return keys


def assert_unique(keys: list[dict]) -> None:
    assert len({key["key_ID"] for key in keys}) == len(keys)
    assert len({key["key"] for key in keys}) == len(keys)


def test_concurrent_requests_through_both_front_ends_never_share_a_key(kmes):
    network, ports, _ = kmes
    routes = [("a", "b"), ("b", "a")] * 8
    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda route: [key for _ in range(10)
                                               for key in deliver_and_fetch(network, ports, *route, 2, 4)], routes))
    keys = [key for batch in batches for key in batch]
    assert len(keys) == 16 * 10 * 4
    assert_unique(keys)
    counts = network[1].ledger.assert_exact(1)
    assert counts["delivered"] == len(keys) and network[1].ledger.waiting() == 0


def test_a_remote_activation_is_answered_by_either_inter_kme_front_end(kmes):
    network, ports, forwarder = kmes
    kme1, kme2 = network[1], network[2]
    received = []
    for front_end, port in (("kme", kme1.port("kmes_https_interface")), ("kme_b", ports["kme_b"])):
        forwarder.switch(port)
        given = kme2.sae(3).post(f"{kme2.url()}/keys/1/enc_keys", json={"number": 2}, timeout=20)
        assert given.status_code == 200, given.text
        wait_until(lambda: ACTIVATION_ROUTE in kme1.processes[front_end].output())
        for via in ("a", "b"):
            keys = given.json()["keys"][:1] if via == "a" else given.json()["keys"][1:]
            fetched = kme1.sae(1).post(f"{urls(network, ports)[via]}/keys/3/dec_keys",
                                       json={"key_IDs": [{"key_ID": key["key_ID"]} for key in keys]}, timeout=20)
            assert fetched.status_code == 200 and fetched.json()["keys"] == keys
        received += given.json()["keys"]
    assert_unique(received)
    for kme, link in ((kme1, 2), (kme2, 1)):
        kme.ledger.assert_exact(link)


def test_one_activation_sent_to_both_inter_kme_front_ends_at_once_takes_effect_once(kmes):
    network, ports, _ = kmes
    kme1 = network[1]
    # Keys KME 1 lends to KME 2's direction of the link (asked directly: KME 2's own store does not know), then
    # activated as KME 2 would ask, at both front ends at once (a retry after a timeout lands on the other host
    # while the first attempt still runs).
    run = network.lease_as(2, 1, {"lease_ID": str(uuid.uuid4()), "minimum": 2, "wanted": 2})["runs"][0]
    positions = [run["first"], run["first"] + 1]
    request = {"activation_ID": str(uuid.uuid4()), "master_SAE_ID": 3, "slave_SAE_IDs": [1], "size": 256,
               "keys": [{"key_ID": str(uuid.uuid4()), "parts": [{"file": run["file"], "position": position}]}
                        for position in positions]}
    before = kme1.ledger.assert_exact(2)
    session = network.peer_client(2, 1).session
    front_ends = [kme1.port("kmes_https_interface"), ports["kme_b"]]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda port: session.post(f"https://127.0.0.1:{port}/api/v1/kme/activations",
                                                          json=request, timeout=20), front_ends))
    assert [answer.status_code for answer in answers] == [200, 200], [answer.text for answer in answers]
    assert answers[0].json() == answers[1].json()
    after = kme1.ledger.assert_exact(2)
    assert (after["peer_held"], after["delivered"]) == (before["peer_held"] - 2, before["delivered"] + 2)
    fetched = kme1.sae(1).post(f"{urls(network, ports)['b']}/keys/3/dec_keys",
                               json={"key_IDs": [{"key_ID": key["key_ID"]} for key in request["keys"]]}, timeout=20)
    assert fetched.status_code == 200 and len(fetched.json()["keys"]) == 2


def test_one_front_end_killed_under_load_the_other_serves_on_and_the_accounting_stays_exact(kmes):
    network, ports, _ = kmes
    kme1 = network[1]
    base = urls(network, ports)
    stop, killed = threading.Event(), threading.Event()
    answered: dict[str, list] = {"a": [], "b": []}
    failures: dict[str, int] = {"a": 0, "b": 0}

    def load(via: str) -> None:
        with kme1.sae(1) as session:
            while not stop.is_set():
                try:
                    response = session.post(f"{base[via]}/keys/2/enc_keys", json={"number": 2}, timeout=10)
                except requests.RequestException:
                    failures[via] += 1
                    # A client of the killed front end gives up on it (a balancer would send it elsewhere).
                    if killed.is_set():
                        return
                    continue
                if response.status_code == 200:
                    answered[via].append(response.json()["keys"])
                else:
                    failures[via] += 1

    threads = [threading.Thread(target=load, args=(via,)) for via in ("a", "a", "b", "b")]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answered["a"]) >= 20 and len(answered["b"]) >= 20, timeout=60)
        killed.set()
        front_end = kme1.processes.pop("sae")
        kill_family(front_end)
        front_end.log.close()
        served_by_b_at_kill = len(answered["b"])
        wait_until(lambda: len(answered["b"]) >= served_by_b_at_kill + 40, timeout=60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures["b"] == 0
    keys = [key for via in "ab" for batch in answered[via] for key in batch]
    assert_unique(keys)
    # Every key a master was given is fetched once by its slave, through the front end that lives on.
    fetched = []
    for start in range(0, len(keys), 100):
        chunk = keys[start:start + 100]
        response = kme1.sae(2).post(f"{base['b']}/keys/1/dec_keys",
                                    json={"key_IDs": [{"key_ID": key["key_ID"]} for key in chunk]}, timeout=20)
        assert response.status_code == 200, response.text
        fetched += response.json()["keys"]
    assert fetched == keys
    for key in keys:
        assert len(base64.b64decode(key["key"])) == 32
    # Keys the killed front end committed but never answered wait for their slave; none is lost or counted twice.
    counts = kme1.ledger.assert_exact(1)
    assert counts["delivered"] == len(keys) + kme1.ledger.waiting()
