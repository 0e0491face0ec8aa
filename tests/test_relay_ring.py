"""Relays on a ring 1–2–3–4–1 of real KMEs with static routes (each KME reaches the opposite one clockwise),
and multicast over several next hops, all or none."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fake_peer import FakePeer
from tests.network import Network

# Routing and multicast over several next hops: the statements of each hop are those of test_relay.py, which
# runs on both engines.
pytestmark = pytest.mark.one_engine
from tests.test_relay import assert_links_exact, dec_keys, enc_keys

KEYS_PER_LINK = 400
LINKS = [(1, 2), (2, 3), (3, 4), (4, 1)]
ROUTES = {1: {3: 2}, 2: {4: 3}, 3: {1: 4}, 4: {2: 1}}
# A master SAE at each KME and a slave at the opposite one.
OPPOSITE = {(1, 1): (3, 5), (2, 3): (4, 6), (3, 5): (1, 1), (4, 6): (2, 3)}


@pytest.fixture(scope="module")
def ring(tmp_path_factory, pki):
    network = Network(tmp_path_factory.mktemp("ring"), pki, LINKS, routes=ROUTES, workers=1)
    try:
        yield network.start_with_links(LINKS, KEYS_PER_LINK)
    finally:
        network.stop_all()


def assert_ring_exact(network) -> dict:
    return assert_links_exact(network, LINKS)


def test_every_kme_relays_to_the_opposite_one_at_once(ring):
    before = assert_ring_exact(ring)
    with ThreadPoolExecutor(4) as pool:
        asked = {(kme, master): pool.submit(enc_keys, ring, kme, master, slave[1], number=2)
                 for (kme, master), slave in OPPOSITE.items()}
        answers = {origin: future.result() for origin, future in asked.items()}
    for (kme, master), answer in answers.items():
        assert answer.status_code == 200, answer.text
        far_kme, slave = OPPOSITE[kme, master]
        keys = answer.json()["keys"]
        assert dec_keys(ring, far_kme, slave, master, keys).json()["keys"] == keys
    after = assert_ring_exact(ring)
    # Each relay crossed two links clockwise, 2 keys and a MAC key on each: every link carried two relays.
    assert {link: after[link]["delivered"] - before[link]["delivered"] for link in LINKS} == {link: 6 for link in LINKS}


def test_multicast_over_two_next_hops_seals_the_key_for_the_second(ring):
    answer = enc_keys(ring, 1, 1, 3, number=3, additional_slave_SAE_IDs=[6, 5])
    assert answer.status_code == 200, answer.text
    keys = answer.json()["keys"]
    for kme, slave in ((2, 3), (4, 6), (3, 5)):
        assert dec_keys(ring, kme, slave, 1, keys).json()["keys"] == keys
    assert_ring_exact(ring)


def test_multicast_is_all_or_none_when_one_branch_fails(ring):
    before = assert_ring_exact(ring)
    ring[4].stop("kme")
    try:
        answer = enc_keys(ring, 1, 1, 3, number=2, additional_slave_SAE_IDs=[5, 6])
    finally:
        ring[4].start("kme")
    assert answer.status_code == 503
    assert answer.json()["message"].startswith("relay failed at hop KME 1 -> KME 4: KME 4 could not be reached")
    after = assert_ring_exact(ring)
    # The branch through KME 2 had arrived, held from its slaves: cancelled there and at KME 3.
    # KME 3, the last hop of that branch, said it held them (key IDs, never keys).
    held = [line.split()[1] for (line,) in ring[3].ledger._query(
        "SELECT message FROM events WHERE message LIKE ? ORDER BY id DESC LIMIT 2", "%once the relay is released")]
    assert len(held) == 2
    for kme, slave in ((2, 3), (3, 5)):
        refused = dec_keys(ring, kme, slave, 1, [{"key_ID": key_id} for key_id in held])
        assert refused.status_code == 400
        assert ring[kme].ledger.waiting() == 0
    assert after[1, 2]["discarded"] - before[1, 2]["discarded"] == 3
    assert after[2, 3]["discarded"] - before[2, 3]["discarded"] == 3
    assert after[4, 1]["discarded"] == before[4, 1]["discarded"]


def test_the_branches_of_a_multicast_leave_together(ring):
    """KME 1 sends its two next hops their messages at once: KMEs 2 and 4, replaced by fakes, confirm a relay only
    once both received theirs (one after the other, the first would wait past KME 1's read timeout).

    Last in the module: the fakes keep no keys, so the ring's two ends no longer match on links 1–2 and 4–1."""
    barrier = threading.Barrier(2)
    fakes = []
    for kme in (2, 4):
        ring[kme].stop("kme")
        certs = ring.pki.folder / f"kme{kme}"
        fakes.append(FakePeer(ring[kme].port("kmes_https_interface"), str(certs / "kme_server.crt"),
                              str(certs / "kme_server.key"), "together", barrier=barrier))
    try:
        answer = enc_keys(ring, 1, 1, 3, number=2, additional_slave_SAE_IDs=[6])
    finally:
        for fake in fakes:
            fake.close()
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["keys"]) == 2
    assert not barrier.broken
