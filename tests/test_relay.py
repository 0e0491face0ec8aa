"""Relays through trusted nodes between real KMEs on 127.0.0.1: a line 1–2–3–4 with static routes.

KME 1 also routes KME 5 and KME 6 through KME 2, which sends KME 5 back to KME 1 (a loop across two
configurations) and knows nothing of KME 6: neither runs.
"""
import base64
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.fake_peer import FakePeer
from tests.network import Network, line_routes
from tests.support import load_json, run_cli, wait_until

KEYS_PER_LINK = 600
LINKS = [(1, 2), (2, 3), (3, 4)]


def _routes() -> dict[int, dict[int, int]]:
    routes = line_routes([1, 2, 3, 4])
    routes[1].update({5: 2, 6: 2})
    routes[2][5] = 1
    return routes


# The peers' read timeout in this module. With the tests' 2 s, a trusted node gives its next hop 1.6 s: two relays
# crossing at KMEs 2 and 3 right after the start (each borrowing its first keys) overran it in the PostgreSQL pass
# of two fresh clones, running beside the SQLite pass on 2 cores. What this module tests is a relay's outcome and
# accounting, not its speed; the failures it makes wait out the timeout all the same.
READ_TIMEOUT = 4


@pytest.fixture(scope="module")
def line(tmp_path_factory, pki):
    network = Network(tmp_path_factory.mktemp("line"), pki, LINKS, routes=_routes(), workers=1)
    for kme in network.kmes.values():
        raw = load_json(kme.config)
        for peer in raw["other_kmes"]:
            peer["read_timeout_seconds"] = READ_TIMEOUT
        kme.config.write_text(json.dumps(raw))
    try:
        yield network.start_with_links(LINKS, KEYS_PER_LINK)
    finally:
        network.stop_all()


def enc_keys(network, kme: int, master: int, slave: int, **body):
    return network[kme].sae(master).post(f"{network[kme].url()}/keys/{slave}/enc_keys", json=body, timeout=30)


def dec_keys(network, kme: int, slave: int, master: int, keys: list[dict]):
    return network[kme].sae(slave).post(f"{network[kme].url()}/keys/{master}/dec_keys",
                                        json={"key_IDs": [{"key_ID": key["key_ID"]} for key in keys]}, timeout=30)


def pool_positions(network, kme: int, link: int) -> set[tuple[str, int]]:
    return set(network[kme].ledger._query(
        "SELECT f.name, p.position FROM pool_keys p JOIN key_files f ON f.id = p.file_id WHERE p.link_id = ?", link))


def settled(network) -> bool:
    """No KME has a hop of a relay in flight: every outgoing row settled, every held relay decided."""
    return all(kme.ledger._query("SELECT COUNT(*) FROM outgoing_activations")[0][0] == 0 and
               kme.ledger._query("SELECT COUNT(*) FROM incoming_activations WHERE state = 'relaying'")[0][0] == 0
               for kme in network.kmes.values())


def assert_links_exact(network, links=LINKS) -> dict:
    """Once settled: every link's counters add up at both ends, both ends count the same fates, and both hold the
    same positions (a position used, discarded or set aside at one end is gone at the other too)."""
    wait_until(lambda: settled(network), 30)
    counts = {}
    for a, b in links:
        one, two = network[a].ledger.assert_exact(b), network[b].ledger.assert_exact(a)
        assert (one["delivered"], one["discarded"]) == (two["delivered"], two["discarded"]), (a, b, one, two)
        assert pool_positions(network, a, b) == pool_positions(network, b, a), (a, b)
        counts[a, b] = one
    return counts


def consumed(before: dict, after: dict, fate: str) -> dict:
    return {link: after[link][fate] - before[link][fate] for link in before}


def test_a_key_relayed_over_two_trusted_nodes_both_directions_at_once(line):
    before = assert_links_exact(line)
    with ThreadPoolExecutor(2) as pool:
        east = pool.submit(enc_keys, line, 1, 1, 6, number=3, size=512)
        west = pool.submit(enc_keys, line, 4, 6, 1, number=2)
        east, west = east.result(), west.result()
    assert east.status_code == 200, east.text
    assert west.status_code == 200, west.text
    east_keys, west_keys = east.json()["keys"], west.json()["keys"]
    assert [len(base64.b64decode(key["key"])) for key in east_keys] == [64, 64, 64]
    assert dec_keys(line, 4, 6, 1, east_keys).json()["keys"] == east_keys
    assert dec_keys(line, 1, 1, 6, west_keys).json()["keys"] == west_keys
    after = assert_links_exact(line)
    # Each hop: 3 keys of 2 parts and a MAC key east, 2 keys of 1 part and a MAC key west.
    assert consumed(before, after, "delivered") == {link: 7 + 3 for link in LINKS}
    assert consumed(before, after, "discarded") == {link: 0 for link in LINKS}
    for a, b in LINKS:
        assert line[a].ledger._query("SELECT relayed FROM links WHERE peer_kme_id = ?", b)[0][0] >= 10


def test_status_of_a_relayed_slave_counts_the_first_hop(line):
    status = line[1].sae(1).get(f"{line[1].url()}/keys/6/status", timeout=10).json()
    assert (status["source_KME_ID"], status["target_KME_ID"], status["slave_SAE_ID"]) == ("1", "4", "6")
    assert status["stored_key_count"] > 0


def test_multicast_to_slaves_at_kme_2_and_kme_4(line):
    before = assert_links_exact(line)
    answer = enc_keys(line, 1, 1, 3, number=2, additional_slave_SAE_IDs=[6])
    assert answer.status_code == 200, answer.text
    keys = answer.json()["keys"]
    assert dec_keys(line, 2, 3, 1, keys).json()["keys"] == keys
    assert dec_keys(line, 4, 6, 1, keys).json()["keys"] == keys
    after = assert_links_exact(line)
    assert consumed(before, after, "delivered") == {link: 3 for link in LINKS}
    assert line[2].ledger.waiting() == line[4].ledger.waiting() == 0


def test_operators_see_relays_without_key_material(line):
    answer = enc_keys(line, 1, 1, 6, number=2)
    keys = answer.json()["keys"]
    assert dec_keys(line, 4, 6, 1, keys).status_code == 200
    line[2].start("debug")
    try:
        wait_until(lambda: requests.get(line[2].debug_url() + "/links", timeout=5).ok, 20)
        links = {link["link"]: link for link in requests.get(line[2].debug_url() + "/links", timeout=5).json()}
        assert links[1]["relayed"] > 0 and links[3]["relayed"] > 0
        metrics = requests.get(line[2].debug_url() + "/metrics", timeout=5).text
        assert 'kme_link_keys_total{kind="relayed",link="3"}' in metrics
        events = requests.get(line[2].debug_url() + "/messages", timeout=5).json()
    finally:
        line[2].stop("debug")
    relay_lines = [event["message"] for event in events if "relayed to KME 3" in event["message"]]
    assert any(keys[0]["key_ID"] in text for text in relay_lines)
    status = run_cli(["kme-status"], line[2].config)
    assert status.returncode == 0, status.stderr
    assert "KME 4     KME 3     relayed" in status.stdout and "KME 5     KME 1     relayed" in status.stdout
    for kme in (2, 3):
        texts = [line[kme].ledger.contents()] + [path.read_text() for path in line[kme].folder.glob("*.log")]
        for key in keys:
            material = base64.b64decode(key["key"])
            for text in texts:
                assert key["key"] not in text and material.hex() not in text


def _fake_kme_3(line, mode):
    line[3].stop("kme")
    certs = line.pki.folder / "kme3"
    return FakePeer(line[3].port("kmes_https_interface"), str(certs / "kme_server.crt"),
                    str(certs / "kme_server.key"), mode, untrusted_ca=str(certs / "ca_saes.crt"))


@pytest.mark.parametrize("failure, reason", [
    ("down", "KME 3 could not be reached"),
    ("hang", "KME 3 did not answer in time or answered wrongly"),
    ("refuse", "KME 3 refused it (HTTP 409)"),
    # The same path through the store as "hang": different only in the HTTP client.
    pytest.param("garbage", "KME 3 did not answer in time or answered wrongly", marks=pytest.mark.one_engine),
    pytest.param("miscount", "KME 3 did not answer in time or answered wrongly", marks=pytest.mark.one_engine),
    # TLS broken once the hop's message started: its pads and MAC key may be on the wire, never reused.
    pytest.param("corrupt", "KME 3 did not answer in time or answered wrongly", marks=pytest.mark.one_engine),
    pytest.param("refuse_certificate", "KME 3 did not answer in time or answered wrongly",
                 marks=pytest.mark.one_engine),
])
def test_a_failing_middle_node_is_named_and_every_link_accounts_for_it(line, failure, reason):
    before = assert_links_exact(line)
    fake = None if failure == "down" else _fake_kme_3(line, failure)
    if failure == "down":
        line[3].stop("kme")
    try:
        answer = enc_keys(line, 1, 1, 6, number=2)
    finally:
        if fake is not None:
            fake.close()
        line[3].start("kme")
    assert answer.status_code == 503
    body = answer.json()
    assert body["message"].startswith(f"relay failed at hop KME 2 -> KME 3: {reason}"), body
    assert body["details"][0]["relay_failure"]["at_KME_ID"] == 2
    after = assert_links_exact(line)
    assert consumed(before, after, "delivered") == {link: 0 for link in LINKS}
    # The first hop's keys left KME 1 and are discarded at both ends; the second hop's too once they left KME 2.
    sent_on = 0 if failure == "down" else 3
    assert consumed(before, after, "discarded") == {(1, 2): 3, (2, 3): sent_on, (3, 4): 0}
    assert enc_keys(line, 1, 1, 6).status_code == 200


@pytest.mark.parametrize("slave, reason", [
    (8, "relay failed at hop KME 2 -> KME 6: KME 2 has no route to KME 6"),
    (7, "relay failed at hop KME 2 -> KME 1: KME 1 is on the relay's path already (a routing loop)"),
])
def test_an_unknown_route_or_a_loop_further_on_is_refused_and_accounted(line, slave, reason):
    before = assert_links_exact(line)
    answer = enc_keys(line, 1, 1, slave)
    assert answer.status_code == 503 and answer.json()["message"] == reason
    after = assert_links_exact(line)
    assert consumed(before, after, "discarded") == {(1, 2): 2, (2, 3): 0, (3, 4): 0}


def test_a_release_is_sent_again_until_the_next_hop_answers_and_dropped_if_refused(line):
    """KME 3 holds a release for KME 4 (as after a multicast whose release met KME 4 down): its background worker
    keeps it while KME 4 is down, sends it once KME 4 is back; KME 4 knows no such relay and refuses."""
    activation_id = str(uuid.uuid4())
    wire = {"activation_ID": activation_id, "parts": [{"file": "link-3-4.cor", "position": 0}]}
    pending = "SELECT COUNT(*) FROM outgoing_activations WHERE activation_id = ?"
    line[4].stop("kme")
    try:
        line[3].ledger.write(("INSERT INTO outgoing_activations (activation_id, link_id, state, created_at, request) "
                              "VALUES (?, 4, 'releasing', ?, ?)", activation_id, "2026-12-01T00:00:00.000000Z",
                              json.dumps({"wire": wire, "relay": True})))
        wait_until(lambda: f"release of relay activation {activation_id} not sent yet"
                   in (line[3].folder / "ingest.log").read_text(), 20)
        assert line[3].ledger._query(pending, activation_id)[0][0] == 1
    finally:
        line[4].start("kme")
    wait_until(lambda: line[3].ledger._query(pending, activation_id)[0][0] == 0, 30)
    assert line[3].ledger._query("SELECT COUNT(*) FROM events WHERE message LIKE ?",
                                 f"Release of relay activation {activation_id} refused by KME 4 (HTTP 409)%")[0][0] == 1
    # A release for a link no longer configured is dropped the same way.
    gone = str(uuid.uuid4())
    line[3].ledger.write(("INSERT INTO outgoing_activations (activation_id, link_id, state, created_at, request) "
                          "VALUES (?, 9, 'releasing', ?, ?)", gone, "2026-12-01T00:00:00.000000Z",
                          json.dumps({"wire": {**wire, "activation_ID": gone}, "relay": True})))
    wait_until(lambda: line[3].ledger._query(pending, gone)[0][0] == 0, 30)
    assert line[3].ledger._query("SELECT COUNT(*) FROM events WHERE message LIKE ?",
                                 f"Release of relay activation {gone} not sent: KME 9 left the configuration%")[0][0] == 1
    assert_links_exact(line)


def test_a_trusted_node_out_of_key_material_on_its_next_link(line):
    drain = line[3].sae(5)
    while drain.post(f"{line[3].url()}/keys/6/enc_keys", json={"number": 16, "size": 4096},
                     timeout=30).status_code == 200:
        pass
    while drain.post(f"{line[3].url()}/keys/6/enc_keys", timeout=30).status_code == 200:
        pass
    before = assert_links_exact(line)
    answer = enc_keys(line, 1, 1, 6)
    assert answer.status_code == 503
    assert answer.json()["message"] == ("relay failed at hop KME 3 -> KME 4: not enough key material on the link")
    after = assert_links_exact(line)
    assert consumed(before, after, "discarded") == {(1, 2): 2, (2, 3): 2, (3, 4): 0}
    line.write_link_file(3, 4, "more.cor", 64)
    wait_until(lambda: enc_keys(line, 1, 1, 6).status_code == 200, 30)
    assert_links_exact(line)
