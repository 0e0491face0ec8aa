"""The inter-KME interface: who may activate what, idempotence, three KMEs."""
import base64
import json
import threading
import time
import uuid

import pytest

from kme.errors import PeerRefused
from kme.key_math import one_time
from kme.peers.wire import RELAY_MAC_HEADER
from tests.fake_peer import FakePeer
from tests.network import Network
from tests.support import wait_until


@pytest.fixture(scope="module")
def network(tmp_path_factory, pki):
    network = Network(tmp_path_factory.mktemp("three"), pki, [(1, 2), (1, 3)], routes={2: {3: 1}, 3: {2: 1}})
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


def test_slaves_behind_two_other_kmes_share_one_key(network):
    kme1 = network[1]
    response = kme1.sae(1).post(f"{kme1.url()}/keys/3/enc_keys", json={"additional_slave_SAE_IDs": [5]},
                                timeout=10)
    assert response.status_code == 200, response.text
    keys = response.json()["keys"]
    for kme, slave in ((2, 3), (3, 5)):
        fetched = network[kme].sae(slave).post(f"{network[kme].url()}/keys/1/dec_keys",
                                               json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}, timeout=10)
        assert fetched.json()["keys"] == keys


def soon(seconds: float) -> float:
    """A call's deadline ``seconds`` from now."""
    return time.monotonic() + seconds


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
    lent = network.lease_as(2, 1, {"lease_ID": str(uuid.uuid4()), "minimum": 1, "wanted": 1})["runs"][0]
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
    run = network.lease_as(3, 1, {"lease_ID": str(uuid.uuid4()), "minimum": 1, "wanted": 1})["runs"][0]
    return run["file"], run["first"]


def test_a_lease_is_idempotent_and_lends_only_what_is_free(network):
    to_kme1 = network.peer_client(3, 1)
    request = {"lease_ID": str(uuid.uuid4()), "minimum": 2, "wanted": 3}
    first = network.lease_as(3, 1, request)
    assert sum(run["count"] for run in first["runs"]) == 3
    assert to_kme1.lease(request) == first
    free = network[1].ledger.link(3)["available"]
    nothing = network.lease_as(3, 1, {"lease_ID": str(uuid.uuid4()), "minimum": free + 1, "wanted": free + 1})
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


def progress_push(**fields) -> dict:
    return {"database_ID": "ab" * 16, "known_database_ID": None, "since": 0, "after": 0, "free": 0,
            "files": [{"file": "l13.cor", "offered": 1, "seq": 1}], **fields}


@pytest.mark.parametrize("body, fragment", [
    (progress_push(head=0), "files: a file's seq is past the sender's last change (head)"),
    (progress_push(since=2**53), f"since: Must be greater than or equal to 0 and less than or equal to {2**53 - 1}."),
    (progress_push(files=[{"file": "l13.cor", "offered": 1, "seq": 2**62}]), "files[0].seq: Must be greater"),
])
def test_progress_past_what_its_sender_made_is_400_and_changes_nothing(network, body, fragment):
    to_kme1 = network.peer_client(3, 1)
    # Applied, the push would make KME 1 take "abab…" for KME 3's database (the background's exchanges move the
    # cursors meanwhile).
    cursors = "SELECT peer_database FROM links WHERE peer_kme_id = 3"
    before = network[1].ledger._query(cursors), network[1].ledger.assert_exact(3)
    response = to_kme1.session.post(f"{to_kme1.base}/progress", json=body, timeout=10)
    assert response.status_code == 400 and fragment in response.json()["message"], response.text
    assert (network[1].ledger._query(cursors), network[1].ledger.assert_exact(3)) == before


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
    # KME 1's background worker cancels the refused activation and discards its key; the tests after this one
    # check that their calls change nothing at KME 1, so it must be done first.
    wait_until(lambda: not kme1.ledger._query("SELECT 1 FROM outgoing_activations"), 20)
    assert kme1.ledger.assert_exact(3)["reserved"] == 0


def relay_from_kme3(network, targets: dict[int, list[int]], path=(3,), sealed: bytes | None = None, size=256,
                    activation_id: str | None = None, timeout_ms: int = 2000):
    """A relay KME 3 could send KME 1 on keys KME 1 lent it: (body, MAC, the key it carries)."""
    parts = [borrowed_position(network) for _ in range(2)]
    opened = dict(network[1].ledger.pool_keys("link_id = 3 AND state = 1"))
    key, mac_key = (opened[position] for _name, position in parts)
    entry = {"key_ID": str(uuid.uuid4()), "parts": [{"file": parts[0][0], "position": parts[0][1]}]}
    if sealed is not None:
        entry["sealed"] = base64.b64encode(sealed).decode()
    body = json.dumps({
        "activation_ID": activation_id or str(uuid.uuid4()), "relay_ID": str(uuid.uuid4()), "path": list(path),
        "master_SAE_ID": 5,
        "size": size, "hold": False, "timeout_ms": timeout_ms,
        "targets": [{"kme_ID": kme, "slave_SAE_IDs": slaves} for kme, slaves in targets.items()],
        "keys": [entry], "mac_part": {"file": parts[1][0], "position": parts[1][1]},
    }, separators=(",", ":")).encode()
    return body, one_time.tag(mac_key, body), key


def test_a_relay_is_idempotent_end_to_end_and_so_is_its_cancel(network):
    to_kme1 = network.peer_client(3, 1)
    body, mac, key = relay_from_kme3(network, {2: [3]})
    activation_id = json.loads(body)["activation_ID"]
    first = to_kme1.relay(activation_id, body, mac, soon(5))
    again = to_kme1.relay(activation_id, body, mac, soon(5))
    assert again == first == {"activation_ID": activation_id, "activated": 1}
    assert network[2].ledger.waiting() == 1
    key_id = json.loads(body)["keys"][0]["key_ID"]
    got = network[2].sae(3).get(f"{network[2].url()}/keys/5/dec_keys", params={"key_ID": key_id}, timeout=10)
    assert base64.b64decode(got.json()["keys"][0]["key"]) == key
    as_direct = {**activation(5, [1], [("l13.cor", 1)]), "activation_ID": json.loads(body)["activation_ID"]}
    assert "is a relay" in refused(network, lambda: to_kme1.cancel(as_direct))
    cancel = {"activation_ID": json.loads(body)["activation_ID"],
              "parts": [json.loads(body)["keys"][0]["parts"][0], json.loads(body)["mac_part"]]}
    before = network[2].ledger.assert_exact(1)
    to_kme1.cancel_relay(cancel)
    to_kme1.cancel_relay(cancel)
    assert "cancelled" in refused(network, lambda: to_kme1.relay(activation_id, body, mac, soon(5)))
    # The cancel follows the key to KME 2 (KME 1's background worker): both parts of that hop discarded there.
    wait_until(lambda: not network[1].ledger._query("SELECT 1 FROM outgoing_activations"), 20)
    after = network[2].ledger.assert_exact(1)
    assert (after["delivered"], after["discarded"]) == (before["delivered"] - 2, before["discarded"] + 2)


def test_a_relay_under_one_of_our_own_activation_ids_leaves_that_activations_keys_alone(network):
    """A neighbour chooses the activation ID of its relay hop: naming one of KME 1's own pending activations on
    the link, the relay's held parts and that activation's reserved keys must stay apart."""
    kme1 = network[1]
    network[3].stop("kme")
    certs = network.pki.folder / "kme3"
    hanging = FakePeer(network[3].port("kmes_https_interface"), str(certs / "kme_server.crt"),
                       str(certs / "kme_server.key"), "hang")
    try:
        # KME 3 never answers: the activation's keys stay reserved, its outcome unknown.
        assert kme1.sae(1).post(f"{kme1.url()}/keys/5/enc_keys", json={"number": 2}, timeout=15).status_code == 503
        ((ours,),) = kme1.ledger._query("SELECT activation_id FROM outgoing_activations WHERE link_id = 3")
        reserved = kme1.ledger._query("SELECT COUNT(*) FROM pool_keys WHERE reservation = ?", ours)
        assert reserved == [(2,)]
        body, mac, _key = relay_from_kme3(network, {2: [3]}, activation_id=ours)
        assert network.peer_client(3, 1).relay(ours, body, mac, soon(5)) == {"activation_ID": ours, "activated": 1}
        assert kme1.ledger._query("SELECT COUNT(*) FROM pool_keys WHERE reservation = ?", ours) == reserved
    finally:
        hanging.close()
        network[3].start("kme")
    # KME 1's background worker cancels its own activation at KME 3 and discards exactly its two keys.
    wait_until(lambda: not kme1.ledger._query("SELECT 1 FROM outgoing_activations"), 30)
    counts = kme1.ledger.assert_exact(3)
    assert counts["reserved"] == 0


@pytest.mark.postgresql_only
def test_a_cancel_racing_the_completion_of_a_relay_hop_is_never_overwritten(network):
    """PostgreSQL lets transactions interleave: the test holds the relay's row while KME 1 completes the hop
    (its next hop, a fake KME 2, has confirmed), sends the cancel, then lets both go. The cancel must see the
    hop completed and discard its parts, or come first and fail it: never be overwritten."""
    kme1 = network[1]
    network[2].stop("kme")
    certs = network.pki.folder / "kme2"
    gated = FakePeer(network[2].port("kmes_https_interface"), str(certs / "kme_server.crt"),
                     str(certs / "kme_server.key"), "gated")
    body, mac, _key = relay_from_kme3(network, {2: [3]}, timeout_ms=20_000)
    request = json.loads(body)
    cancel = {"activation_ID": request["activation_ID"],
              "parts": [request["keys"][0]["parts"][0], request["mac_part"]]}
    # KME 1's transactions that wait for a lock (its own database only: the cluster serves every KME) running a
    # statement like this: the completion's write of the hop, the cancel's lock on the hop's activation ID.
    answers, waiting = {}, ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND application_name = 'kme' AND wait_event_type = 'Lock' AND query LIKE %s")
    before = kme1.ledger.assert_exact(3)
    to_kme1 = network.peer_client(3, 1)
    relaying = threading.Thread(target=lambda: answers.update(relay=call(
        lambda: to_kme1.relay(request["activation_ID"], body, mac, soon(30)))))
    cancelling = threading.Thread(target=lambda: answers.update(cancel=call(lambda: to_kme1.cancel_relay(cancel))))
    try:
        with kme1.ledger.connect(read_only=False) as holder, kme1.ledger.connect() as watcher:
            relaying.start()
            assert gated.activation_received.wait(20)
            holder.execute("BEGIN")
            holder.execute("SELECT 1 FROM incoming_activations WHERE activation_id = %s FOR UPDATE",
                           (request["activation_ID"],))
            gated.release_answer.set()
            wait_until(lambda: watcher.execute(waiting, ("UPDATE incoming_activations%",)).fetchone()[0] == 1, 20)
            cancelling.start()
            wait_until(lambda: watcher.execute(waiting, ("%pg_advisory_xact_lock(hashtextextended%",)).fetchone()[0]
                       == 1, 20)
            holder.execute("COMMIT")
            relaying.join(30)
            cancelling.join(30)
    finally:
        gated.release_answer.set()
        gated.close()
        network[2].start("kme")
    assert answers["cancel"] is None, answers
    ((state,),) = kme1.ledger._query("SELECT state FROM incoming_activations WHERE activation_id = ?",
                                     request["activation_ID"])
    assert state == "cancelled"
    # Both parts of the hop are discarded at KME 1, whichever came first, and the hop to KME 2 is cancelled too.
    wait_until(lambda: not kme1.ledger._query("SELECT 1 FROM outgoing_activations"), 30)
    after = kme1.ledger.assert_exact(3)
    assert (after["discarded"], after["reserved"]) == (before["discarded"] + 2, 0)
    kme1.ledger.assert_exact(2)


def call(function):
    """None if ``function()`` returned, else the exception it raised."""
    try:
        function()
    except Exception as exc:  # noqa: BLE001 - the test reports whatever the call raised
        return exc
    return None


@pytest.mark.parametrize("alteration", ["body", "tag"])
def test_a_relay_that_fails_its_mac_is_400_and_its_parts_never_serve_again(network, alteration):
    """A forger has seen a tag under the hop's MAC key: its parts are discarded, the hop recorded as cancelled."""
    to_kme1 = network.peer_client(3, 1)
    body, mac, _key = relay_from_kme3(network, {2: [3]})
    before = network[1].ledger.assert_exact(3), network[2].ledger.assert_exact(1)
    sent, tag = ((body.replace(b'"slave_SAE_IDs":[3]', b'"slave_SAE_IDs":[4]'), mac) if alteration == "body"
                 else (body, bytes(16)))
    response = to_kme1.session.post(f"{to_kme1.base}/relays", data=sent, timeout=10, headers={
        "Content-Type": "application/json", RELAY_MAC_HEADER: base64.b64encode(tag)})
    assert response.status_code == 400, response.text
    assert response.json()["message"] == "the relay message fails its integrity check (one-time MAC)"
    after = network[1].ledger.assert_exact(3), network[2].ledger.assert_exact(1)
    assert after[1] == before[1]
    assert (after[0]["discarded"], after[0]["peer_held"]) == (before[0]["discarded"] + 2, before[0]["peer_held"] - 2)
    # The genuine message, later, finds the hop cancelled; the sender's own cancel changes nothing more.
    activation_id = json.loads(body)["activation_ID"]
    assert "cancelled" in refused(network, lambda: to_kme1.relay(activation_id, body, mac, soon(5)))
    to_kme1.cancel_relay({"activation_ID": json.loads(body)["activation_ID"],
                          "parts": [json.loads(body)["keys"][0]["parts"][0], json.loads(body)["mac_part"]]})
    assert network[1].ledger.assert_exact(3) == after[0]


@pytest.mark.parametrize("case, fragment", [
    ("path not ending at the caller", "the relay's path does not end at the calling KME 3"),
    ("unknown origin", "KME 9, where the relay starts, is unknown to this KME"),
    ("a slave that is not ours", "SAE 3 is not an SAE of this KME"),
    ("sealed of the wrong length", "sealed: every key or none, each of 32 bytes"),
    ("no MAC", "KME-Relay-MAC: missing"),
])
def test_relays_outside_the_callers_rights_are_refused(network, case, fragment):
    to_kme1 = network.peer_client(3, 1)
    targets, path, sealed = {2: [3]}, (3,), None
    if case == "path not ending at the caller":
        path = (2,)
    elif case == "unknown origin":
        path = (9, 3)
    elif case == "a slave that is not ours":
        targets = {1: [3]}
    elif case == "sealed of the wrong length":
        sealed = bytes(31)
    body, mac, _key = relay_from_kme3(network, targets, path, sealed)
    before = network[1].ledger.assert_exact(3), network[2].ledger.assert_exact(1)
    headers = {"Content-Type": "application/json"}
    if case != "no MAC":
        headers[RELAY_MAC_HEADER] = base64.b64encode(mac)
    response = to_kme1.session.post(f"{to_kme1.base}/relays", data=body, timeout=10, headers=headers)
    assert response.status_code in (400, 403) and fragment in response.json()["message"], response.text
    assert (network[1].ledger.assert_exact(3), network[2].ledger.assert_exact(1)) == before
