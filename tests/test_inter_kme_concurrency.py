"""Both directions of a link at once: the two KMEs never hand out the same key position."""
import base64
import random
import threading
from concurrent.futures import ThreadPoolExecutor

from tests.network import Network

REQUESTS_EACH_WAY = 220
THREADS_EACH_WAY = 4
KEYS_IN_FILES = 2 * 800


def test_both_directions_concurrently_never_share_a_position(tmp_path, pki):
    network = Network(tmp_path, pki, [(1, 2)])
    data = network.write_link_file(1, 2, "a.cor", KEYS_IN_FILES // 2)
    data += network.write_link_file(1, 2, "b.cor", KEYS_IN_FILES // 2)
    network.start_all()
    try:
        network.wait_for_link(1, 2, KEYS_IN_FILES)
        local = threading.local()
        rng = random.Random(3)
        plan = [(1, 1, 3, rng.randint(1, 3)) for _ in range(REQUESTS_EACH_WAY)]
        plan += [(2, 3, 1, rng.randint(1, 3)) for _ in range(REQUESTS_EACH_WAY)]
        rng.shuffle(plan)

        def call(step):
            kme, master, slave, number = step
            sessions = local.__dict__.setdefault("sessions", {})
            if kme not in sessions:
                sessions[kme] = network[kme].sae(master)
            response = sessions[kme].post(f"{network[kme].url()}/keys/{slave}/enc_keys", json={"number": number},
                                          timeout=30)
            return kme, response.status_code, response.json()

        with ThreadPoolExecutor(2 * THREADS_EACH_WAY) as pool:
            results = list(pool.map(call, plan))
    finally:
        network.stop_all()

    assert all(code in (200, 503) for _, code, _ in results)
    served = [(kme, key) for kme, code, body in results if code == 200 for key in body["keys"]]
    assert sum(1 for kme, _ in served if kme == 1) > 150 and sum(1 for kme, _ in served if kme == 2) > 150
    ids = [key["key_ID"] for _, key in served]
    assert len(set(ids)) == len(ids)
    positions = {}
    for kme, key in served:
        material = base64.b64decode(key["key"])
        position = data.find(material)
        assert position >= 0 and position % 32 == 0
        position //= 32
        assert position not in positions, "a key position was handed out twice"
        positions[position] = kme
    for kme, peer in ((1, 2), (2, 1)):
        counts = network[kme].ledger.assert_exact(peer)
        assert counts["reserved"] == 0
    one, two = network[1].ledger.link(2), network[2].ledger.link(1)
    assert one["delivered"] == two["delivered"] == len(served)
    # KME 2's direction served only what KME 1 lent it.
    lending = [network[kme].ledger._query("SELECT lent, borrowed FROM links WHERE peer_kme_id = ?", peer)[0]
               for kme, peer in ((1, 2), (2, 1))]
    assert lending[0] == lending[1][::-1] and lending[1][1] >= sum(1 for kme, _ in served if kme == 2)
