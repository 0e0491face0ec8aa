"""Both directions of a link draw on all of its keys, only keys both ends hold are used, nothing wedges.

Real KMEs on 127.0.0.1 (gunicorn, mutual TLS, watchdog workers). Every key
handed out is mapped back to its (file, position) through its material:
no position may serve two keys, and the slave's copy must be the master's.
"""
import base64
import json
import os
import threading
import uuid

import pytest
import requests

from kme.errors import PeerRefused
from kme.storage.keystore import leases
from tests.fake_peer import FakePeer
from tests.network import Network
from tests.support import kill_family, wait_until

MASTER_OF = {1: (1, 3), 2: (3, 1)}


def started(tmp_path, pki, grace: float):
    network = Network(tmp_path, pki, [(1, 2)], unmatched_key_grace_seconds=grace, workers=1)
    network.start_all()
    return network


@pytest.fixture
def network(tmp_path, pki):
    network = started(tmp_path, pki, 120)
    yield network
    network.stop_all()


@pytest.fixture
def impatient_network(tmp_path, pki):
    """Keys only one end holds are set aside after 1 s."""
    network = started(tmp_path, pki, 1)
    yield network
    network.stop_all()


class Placements:
    """Every key handed out, mapped back to the (file, position) of each 256-bit part."""

    def __init__(self):
        self.index: dict[bytes, tuple[str, int]] = {}
        self.used: dict[tuple[str, int], str] = {}

    def add_file(self, name: str, data: bytes) -> None:
        self.index.update({data[i:i + 32]: (name, i // 32) for i in range(0, len(data), 32)})

    def record(self, keys: list[dict]) -> None:
        for key in keys:
            material = base64.b64decode(key["key"])
            for offset in range(0, len(material), 32):
                place = self.index[material[offset:offset + 32]]
                assert place not in self.used, f"{place} used by {self.used[place]} and {key['key_ID']}"
                self.used[place] = key["key_ID"]


def confirmed(network: Network, total: int) -> None:
    """Wait until both KMEs hold ``total`` keys of the link, all confirmed."""
    wait_until(lambda: all(network[a].ledger.link(b)["ingested"] == total and
                           network[a].ledger.link(b)["unconfirmed"] == 0 for a, b in ((1, 2), (2, 1))), timeout=20)


def take(network: Network, side: int, number: int):
    kme = network[side]
    master, slave = MASTER_OF[side]
    return kme.sae(master).post(f"{kme.url()}/keys/{slave}/enc_keys", json={"number": number}, timeout=15)


def fetch(network: Network, side: int, keys: list[dict]) -> list[dict]:
    """The slave's copy, fetched at the other KME."""
    kme = network[3 - side]
    master, slave = MASTER_OF[side]
    answer = kme.sae(slave).post(f"{kme.url()}/keys/{master}/dec_keys",
                                 json={"key_IDs": [{"key_ID": key["key_ID"]} for key in keys]}, timeout=15)
    assert answer.status_code == 200, answer.text
    return answer.json()["keys"]


def refused_for_lack_of_keys(answer) -> bool:
    return answer.status_code == 503 and answer.json()["message"].startswith("not enough key material")


def lending(kme, link: int) -> tuple[int, int]:
    """(lent, borrowed) keys of the link at ``kme``."""
    return kme.ledger._query("SELECT lent, borrowed FROM links WHERE peer_kme_id = ?", link)[0]


def assert_exact_and_disjoint(network: Network) -> None:
    """Both ledgers balance; no key is free for both directions; what one lent the other borrowed."""
    network[1].ledger.assert_exact(2)
    network[2].ledger.assert_exact(1)
    assert lending(network[1], 2) == lending(network[2], 1)[::-1]
    free = [set(kme.ledger._query("SELECT f.name, p.position FROM pool_keys p JOIN key_files f ON f.id = p.file_id "
                                  "WHERE p.state = 0")) for kme in (network[1], network[2])]
    assert not free[0] & free[1]


def test_one_master_alone_drains_a_multi_file_link(network):
    placements = Placements()
    for name in ("a.cor", "b.cor", "c.cor"):
        placements.add_file(name, network.write_link_file(1, 2, name, 100))
    confirmed(network, 300)
    # KME 2 does not arbitrate the link: every key it serves is borrowed from KME 1's direction.
    while (answer := take(network, 2, 10)).status_code == 200:
        keys = answer.json()["keys"]
        placements.record(keys)
        assert fetch(network, 2, keys) == keys
    assert refused_for_lack_of_keys(answer), answer.text
    assert len(placements.used) == 300
    assert_exact_and_disjoint(network)
    assert lending(network[1], 2) == (300, 0)


@pytest.mark.one_engine
@pytest.mark.parametrize("ratio", [(3, 1), (10, 1), (1, 1)], ids=["3:1", "10:1", "alternating"])
def test_lopsided_demand_uses_every_key_before_a_refusal(network, ratio):
    placements = Placements()
    placements.add_file("link.cor", network.write_link_file(1, 2, "link.cor", 400))
    confirmed(network, 400)
    turns = [1] * ratio[0] + [2] * ratio[1]
    served = 0
    while (answer := take(network, turns[served % len(turns)], 4)).status_code == 200:
        side = turns[served % len(turns)]
        keys = answer.json()["keys"]
        placements.record(keys)
        assert fetch(network, side, keys) == keys
        served += 1
    assert refused_for_lack_of_keys(answer), answer.text
    assert len(placements.used) >= 0.99 * 400
    assert_exact_and_disjoint(network)


def status(network: Network, side: int) -> int:
    kme = network[side]
    master, slave = MASTER_OF[side]
    return kme.sae(master).get(f"{kme.url()}/keys/{slave}/status", timeout=10).json()["stored_key_count"]


@pytest.mark.one_engine
def test_keys_the_peer_has_not_ingested_are_neither_counted_nor_served(network):
    network.write_link_file(1, 2, "first.cor", 50)
    confirmed(network, 50)
    network[2].stop("ingest")
    network.write_link_file(1, 2, "second.cor", 100)
    wait_until(lambda: network[1].ledger.link(2)["ingested"] == 150)
    assert network[1].ledger.link(2)["unconfirmed"] == 100
    assert status(network, 1) == 50
    for _ in range(5):
        answer = take(network, 1, 10)
        assert answer.status_code == 200, answer.text
    assert refused_for_lack_of_keys(take(network, 1, 1))

    network[2].start("ingest")
    wait_until(lambda: status(network, 1) == 100, timeout=20)
    assert take(network, 1, 100).status_code == 200
    assert_exact_and_disjoint(network)


@pytest.mark.one_engine
def test_a_file_shorter_at_one_end_sets_the_surplus_aside_and_the_link_serves_the_rest(impatient_network):
    network = impatient_network
    placements = Placements()
    data = os.urandom(32 * 100)
    placements.add_file("short.cor", data)
    for side, length in ((1, 100), (2, 60)):
        staging = network[side].folder / ".short.part"
        staging.write_bytes(data[:32 * length])
        os.rename(staging, network[side].link_folder(3 - side) / "short.cor")
    # KME 1 sets aside the 40 keys KME 2 never had.
    wait_until(lambda: network[1].ledger.link(2)["set_aside"] == 40, timeout=20)
    assert network[2].ledger.link(1)["set_aside"] == 0
    messages = [message for (message,) in network[1].ledger._query("SELECT message FROM events")]
    assert any("40 keys that KME 2 does not hold" in message and "set aside" in message for message in messages)
    while (answer := take(network, 2, 10)).status_code == 200:
        placements.record(answer.json()["keys"])
    assert refused_for_lack_of_keys(answer), answer.text
    assert sorted(placements.used) == [("short.cor", position) for position in range(60)]
    assert_exact_and_disjoint(network)


def pending_leases(kme) -> int:
    return kme.ledger._query("SELECT COUNT(*) FROM leases WHERE role = 'asked'")[0][0]


@pytest.mark.one_engine
def test_a_lease_whose_answer_was_lost_is_asked_again_and_nothing_is_lost(network):
    network.write_link_file(1, 2, "link.cor", 200)
    confirmed(network, 200)
    # The lender stopped: nothing was lent, the borrower forgets the lease.
    network[1].stop("kme")
    answer = take(network, 2, 4)
    assert answer.status_code == 503 and "KME 1 could not be reached" in answer.json()["message"]
    assert pending_leases(network[2]) == 0
    network[1].start("kme")

    # The lender hangs (its disk stalls) past the borrower's read timeout, then lends: the answer is lost.
    with network[1].ledger.stall():
        answer = take(network, 2, 4)
        assert answer.status_code == 503 and "KME 1 did not answer" in answer.json()["message"], answer.text
        assert pending_leases(network[2]) == 1
        (lease_id,) = network[2].ledger._query("SELECT lease_id FROM leases WHERE role = 'asked'")[0]
    # The background worker asks again under the same lease ID and gets what was lent.
    wait_until(lambda: pending_leases(network[2]) == 0, timeout=30)
    (lent,) = network[1].ledger._query("SELECT parts FROM leases WHERE lease_id = ?", lease_id)[0]
    count = sum(run["count"] for run in json.loads(lent))
    borrowed = [message for (message,) in network[2].ledger._query("SELECT message FROM events")
                if lease_id in message]
    assert count and borrowed == [f"Borrowed {count} keys from KME 1's direction of the link (lease {lease_id})"]
    assert_exact_and_disjoint(network)
    assert take(network, 2, 4).status_code == 200
    assert_exact_and_disjoint(network)


@pytest.mark.one_engine
@pytest.mark.parametrize("mode", ["corrupt", "refuse_certificate"])
def test_a_lease_whose_request_left_before_tls_failed_is_kept_and_asked_again(network, mode):
    """A TLS error once the lease request started (a damaged answer; a TLS 1.3 lender refusing our certificate
    after the request left) may hide a lease the lender committed: the borrower keeps it and asks again."""
    network.write_link_file(1, 2, "link.cor", 200)
    confirmed(network, 200)
    network[1].stop("kme")
    certs = network.pki.folder / "kme1"
    lender = FakePeer(network[1].port("kmes_https_interface"), str(certs / "kme_server.crt"),
                      str(certs / "kme_server.key"), mode, untrusted_ca=str(certs / "ca_saes.crt"))
    try:
        answer = take(network, 2, 4)
        assert answer.status_code == 503, answer.text
        assert answer.json()["message"].startswith("KME 1 broke TLS after the request was sent")
        assert pending_leases(network[2]) == 1
    finally:
        lender.close()
    network[1].start("kme")
    wait_until(lambda: pending_leases(network[2]) == 0, timeout=30)
    assert_exact_and_disjoint(network)
    assert take(network, 2, 4).status_code == 200
    assert_exact_and_disjoint(network)


@pytest.mark.one_engine
def test_leases_the_borrower_never_applied_are_taken_back(network):
    """Twenty lease requests under KME 2's certificate with lease IDs KME 2 never recorded (a peer that
    misbehaves, or answers lost for good) each lent half of KME 1's free keys: KME 1 asks KME 2 about them,
    learns that it never applied them, and takes the keys back."""
    network.write_link_file(1, 2, "link.cor", 400)
    confirmed(network, 400)
    kme1 = network[1]
    before = kme1.ledger.link(2)["available"]
    client = network.peer_client(2, 1)
    with pytest.raises(PeerRefused) as refused:
        client.lease({"lease_ID": str(uuid.uuid4()), "minimum": 0, "wanted": 2**31 - 1})
    assert refused.value.status == 400 and "wanted" in refused.value.detail
    lent = sum(run["count"] for _ in range(20) for run in client.lease(
        {"lease_ID": str(uuid.uuid4()), "minimum": 0, "wanted": leases.MAX_LEASE})["runs"])
    assert lent > before * 0.9
    wait_until(lambda: kme1.ledger._query("SELECT COUNT(*) FROM leases WHERE role = 'given'") == [(0,)], timeout=30)
    assert kme1.ledger.link(2)["available"] == before and lending(kme1, 2) == (0, 0)
    taken_back = [message for (message,) in kme1.ledger._query("SELECT message FROM events")
                  if "taken back: KME 2 never applied it" in message]
    assert len(taken_back) == 20
    assert_exact_and_disjoint(network)
    assert take(network, 1, 100).status_code == 200


@pytest.mark.one_engine
def test_a_lease_applied_is_acknowledged_not_taken_back(network):
    network.write_link_file(1, 2, "link.cor", 200)
    confirmed(network, 200)
    # KME 2's direction is empty: it borrows from KME 1's.
    assert take(network, 2, 4).status_code == 200
    wait_until(lambda: network[1].ledger._query("SELECT role FROM leases") == [("acked",)], timeout=30)
    assert lending(network[1], 2) == lending(network[2], 1)[::-1] != (0, 0)
    assert_exact_and_disjoint(network)


def crash(kme, name: str) -> None:
    """SIGKILL a gunicorn master the test started, and its workers, by pid."""
    process = kme.processes.pop(name)
    kill_family(process)
    process.log.close()


@pytest.mark.one_engine
@pytest.mark.parametrize("crashed", [1, 2], ids=["lender", "borrower"])
def test_a_crash_in_the_middle_of_a_lease(network, crashed):
    network.write_link_file(1, 2, "link.cor", 200)
    confirmed(network, 200)
    interface = "kme" if crashed == 1 else "sae"
    answers = []

    def ask():
        try:
            answers.append(take(network, 2, 4).status_code)
        except requests.RequestException:
            answers.append("cut")

    with network[1].ledger.stall():
        # KME 2 asks KME 1 for a lease, which waits on KME 1's stalled disk; then one of them dies.
        asking = threading.Thread(target=ask)
        asking.start()
        wait_until(lambda: pending_leases(network[2]) == 1)
        crash(network[crashed], interface)
        asking.join()
    network[crashed].start(interface)
    assert answers[0] in (503, "cut")
    # KME 2's background worker asks again under the same lease ID: KME 1 lends once, whatever it did before.
    wait_until(lambda: pending_leases(network[2]) == 0, timeout=30)
    assert_exact_and_disjoint(network)
    answer = take(network, 2, 4)
    assert answer.status_code == 200, answer.text
    assert_exact_and_disjoint(network)
    assert network[1].ledger._query("SELECT COUNT(*) FROM leases WHERE role IN ('given', 'acked')")[0][0] >= 1
