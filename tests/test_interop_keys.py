"""ETSI GS QKD 020 keys from another vendor's KMS, end to end: a stand-in foreign KMS (tests/foreign_kms.py, its own
CA) passes keys to SAEs of KME 1 and, through our link, of KME 2; the SAEs fetch them with ETSI GS QKD 014; the
acknowledgements come back to the stand-in; voids, replays and bad containers change what the draft says and
nothing else. The other way, masters of KME 1, of KME 2 (linked to it) and of KME 3 (behind KME 2, a trusted node)
get keys with the SAE behind the stand-in."""
import base64
import json
import os
import uuid

import pytest
import requests

from kme.errors import PeerRefused
from kme.peers.wire import RELAY_MAC_HEADER
from tests.foreign_kms import StandInKms
from tests.network import Network, line_routes
from tests.support import free_port, load_json, run_cli, wait_until

# The interface and its rules sit above the storage layer, whose statements other tests run on both engines.
pytestmark = pytest.mark.one_engine

LINK_KEYS = 400
ZONE_KEYS = 200
FOREIGN_SAE = "foreign-sae"
LINKS = [(1, 2), (2, 3)]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, pki):
    """KMEs 1, 2 and 3 in a line; KME 1 serves the interop interface to the stand-in, which may deliver to SAEs 1
    and 2 (KME 1) and 3 (KME 2); ``foreign-sae`` lives behind it (at KMEs 2 and 3: an SAE of KME 1)."""
    folder = tmp_path_factory.mktemp("interop")
    kms = StandInKms(folder / "foreign", str(pki.folder / "kme2" / "ca_kmes.crt"), pki.server_ca)
    network = Network(folder, pki, LINKS, routes=line_routes([1, 2, 3]), workers=1)
    raw = load_json(network[1].config)
    raw["this_kme"]["interop_https_interface"] = {
        **raw["this_kme"]["saes_https_interface"], "listen_address": f"127.0.0.1:{free_port()}",
        "ca_client_cert_path": kms.client_ca()}
    raw["foreign_kms"] = [kms.entry(pki, 1, 2, target_sae_ids=[1, 2, 3], ack_attempts=3)]
    raw["saes"].append({"id": FOREIGN_SAE, "kme_id": kms.id})
    network[1].config.write_text(json.dumps(raw))
    for kme in (2, 3):
        raw = load_json(network[kme].config)
        raw["saes"].append({"id": FOREIGN_SAE, "kme_id": 1})
        network[kme].config.write_text(json.dumps(raw))
    network.write_link_file(1, 1, "zone.cor", ZONE_KEYS)
    network.start_with_links(LINKS, LINK_KEYS)
    wait_until(lambda: network[1].ledger.link(1)["ingested"] == ZONE_KEYS, 20)
    network.kms = kms
    network.interop = f"https://{load_json(network[1].config)['this_kme']['interop_https_interface']['listen_address']}"
    yield network
    network.stop_all()
    kms.stop()
    for a, b in LINKS:
        network[a].ledger.assert_exact(b)
        network[b].ledger.assert_exact(a)
    network[1].ledger.assert_exact(kms.id)


def container(keys: list[tuple[str, bytes]], targets, kms: StandInKms, **extra) -> dict:
    return {"keys": [{"key_id": key_id, "value": base64.b64encode(value).decode()} for key_id, value in keys],
            "initiator_sae_id": FOREIGN_SAE, "target_sae_ids": [str(target) for target in targets],
            "ack_callback_url": kms.ack_url, **extra}


def new_keys(count: int = 2, size: int = 32) -> list[tuple[str, bytes]]:
    return [(str(uuid.uuid4()), os.urandom(size)) for _ in range(count)]


def post(gateway, path: str, body, name: str = "foreign-kms"):
    with gateway.kms.session(name) as client:
        return client.post(f"{gateway.interop}/kmapi/v1/{path}", json=body, verify=gateway.pki.server_ca, timeout=20)


def fetch(gateway, kme: int, sae: int, key_ids: list[str]):
    with gateway[kme].sae(sae) as session:
        return session.post(f"{gateway[kme].url()}/keys/{FOREIGN_SAE}/dec_keys",
                            json={"key_IDs": [{"key_ID": key_id} for key_id in key_ids]}, timeout=20)


def statuses(acks: list[dict]) -> dict:
    """{target SAE: ack_status} of acknowledgement containers."""
    return {ack["target_sae_id"]: ack["ack_status"] for ack in acks}


def test_keys_for_an_sae_of_this_kme_are_fetched_once_and_acknowledged(gateway):
    keys = new_keys()
    answer = post(gateway, "ext_keys", container(keys, [1], gateway.kms))
    assert answer.status_code == 202, answer.text
    (ack,) = gateway.kms.acks_for(keys[0][0])
    assert ack == {"key_ids": [{"key_id": key_id} for key_id, _ in keys], "ack_status": "relayed",
                   "initiator_sae_id": FOREIGN_SAE, "target_sae_id": "1"}
    fetched = fetch(gateway, 1, 1, [key_id for key_id, _ in keys])
    assert fetched.status_code == 200, fetched.text
    assert [(key["key_ID"], base64.b64decode(key["key"])) for key in fetched.json()["keys"]] == keys
    again = fetch(gateway, 1, 1, [keys[0][0]])
    assert again.status_code == 400 and again.json()["message"] == "one or more keys specified are not found on KME"
    # SAE 2 is no target of these keys.
    assert fetch(gateway, 1, 2, [keys[1][0]]).status_code in (400, 401)


def test_a_multicast_reaches_an_sae_of_the_linked_kme_by_relay(gateway):
    keys = new_keys(3, 64)
    relayed_before = gateway[1].ledger.link(2)["delivered"]
    assert post(gateway, "ext_keys", container(keys, [1, 3], gateway.kms)).status_code == 202
    assert statuses(gateway.kms.acks_for(keys[0][0], 2)) == {"1": "relayed", "3": "relayed"}
    for kme, sae in ((1, 1), (2, 3)):
        fetched = fetch(gateway, kme, sae, [key_id for key_id, _ in keys])
        assert fetched.status_code == 200, fetched.text
        assert [base64.b64decode(key["key"]) for key in fetched.json()["keys"]] == [value for _, value in keys]
    # Each key of 512 bits crossed the link under two 256-bit pads, the message under one MAC key.
    assert gateway[1].ledger.link(2)["delivered"] == relayed_before + 3 * 2 + 1


def test_a_replay_is_acknowledged_again_and_never_delivered_twice(gateway):
    keys = new_keys(1)
    body = container(keys, [2], gateway.kms)
    assert post(gateway, "ext_keys", body).status_code == 202
    gateway.kms.acks_for(keys[0][0])
    assert fetch(gateway, 1, 2, [keys[0][0]]).status_code == 200
    assert post(gateway, "ext_keys", body).status_code == 202
    assert statuses(gateway.kms.acks_for(keys[0][0], 2)) == {"2": "relayed"}
    assert fetch(gateway, 1, 2, [keys[0][0]]).status_code == 400
    # The same key ID with other SAEs is not a replay.
    other = post(gateway, "ext_keys", container(keys, [1], gateway.kms))
    assert other.status_code == 400 and other.json()["details"] == [
        {"duplicate_key_id": "a key_id of this container was passed before in another one"}]


def test_void_before_the_fetch_discards_the_key_and_after_it_fails(gateway):
    waiting, fetched = new_keys(1), new_keys(1)
    for keys in (waiting, fetched):
        assert post(gateway, "ext_keys", container(keys, [1], gateway.kms)).status_code == 202
        gateway.kms.acks_for(keys[0][0])
    assert fetch(gateway, 1, 1, [fetched[0][0]]).status_code == 200
    void = {"key_ids": [waiting[0][0], fetched[0][0]], "initiator_sae_id": FOREIGN_SAE, "target_sae_ids": ["1"],
            "ack_callback_url": gateway.kms.ack_url}
    assert post(gateway, "ext_keys/void", void).status_code == 202
    (voided,) = [ack for ack in gateway.kms.acks_for(waiting[0][0], 2) if ack["ack_status"] != "relayed"]
    assert voided["ack_status"] == "voided"
    (failed,) = [ack for ack in gateway.kms.acks_for(fetched[0][0], 2) if ack["ack_status"] != "relayed"]
    assert failed["ack_status"] == "failed" and "delivered to the SAE already" in failed["message"]
    assert fetch(gateway, 1, 1, [waiting[0][0]]).status_code == 400
    unknown = post(gateway, "ext_keys/void", {**void, "key_ids": [str(uuid.uuid4())]})
    assert unknown.status_code == 400 and unknown.json()["message"] == "key not present"


def test_void_of_every_key_of_a_pair_needs_the_confirmation(gateway):
    keys = new_keys(2)
    assert post(gateway, "ext_keys", container(keys, [2], gateway.kms)).status_code == 202
    gateway.kms.acks_for(keys[0][0])
    void = {"initiator_sae_id": FOREIGN_SAE, "target_sae_ids": ["2"], "ack_callback_url": gateway.kms.ack_url}
    refused = post(gateway, "ext_keys/void", void)
    assert refused.status_code == 400 and refused.json()["message"] == "no_key_ids_or_confirmation"
    assert post(gateway, "ext_keys/void?all_confirmation=true", void).status_code == 202
    (voided,) = [ack for ack in gateway.kms.acks_for(keys[0][0], 2) if ack["ack_status"] == "voided"]
    assert {item["key_id"] for item in voided["key_ids"]} >= {key_id for key_id, _ in keys}
    assert fetch(gateway, 1, 2, [keys[1][0]]).status_code == 400


def _bad_containers(kms: StandInKms) -> dict:
    keys = new_keys(2)
    good = container(keys, [1], kms)
    return {
        "unknown target SAE": {**good, "target_sae_ids": ["nobody"]},
        "a target it may not deliver to": {**good, "target_sae_ids": ["4"]},
        "a target behind the foreign KMS": {**good, "target_sae_ids": [FOREIGN_SAE]},
        "an initiator not behind it": {**good, "initiator_sae_id": "2"},
        "duplicate key_id": container([keys[0], keys[0]], [1], kms),
        "bad base64": {**good, "keys": [{"key_id": keys[0][0], "value": "not*base64"}]},
        "keys of two lengths": container([keys[0], (keys[1][0], os.urandom(16))], [1], kms),
        "a key too short": container([(keys[0][0], b"\x01")], [1], kms),
        "no callback": {name: value for name, value in good.items() if name != "ack_callback_url"},
        "a callback elsewhere": {**good, "ack_callback_url": "https://192.0.2.1/kmapi/v1/ext_keys/ack"},
        "a plain http callback": {**good, "ack_callback_url": kms.ack_url.replace("https", "http")},
        "no keys": {**good, "keys": []},
        "a key ID that is no UUID": {**good, "keys": [{"key_id": "k1", "value": "AAAA"}]},
        "an unsupported mandatory extension": {**good, "extension_mandatory": {"abc_route": {"x": 1}}},
        "an unknown field": {**good, "colour": "blue"},
    }


def stored(gateway) -> tuple:
    """What KME 1 holds of keys from foreign KMSs (the background's own rows change meanwhile)."""
    ledger = gateway[1].ledger
    return (ledger._query("SELECT * FROM interop_keys ORDER BY key_id, target_sae_id"),
            ledger._query("SELECT key_id FROM delivered_keys ORDER BY key_id"),
            ledger._query("SELECT id FROM interop_acks ORDER BY id"), ledger.link(gateway.kms.id))


def test_bad_containers_are_problems_and_store_nothing(gateway):
    before = stored(gateway)
    for name, body in _bad_containers(gateway.kms).items():
        answer = post(gateway, "ext_keys", body)
        assert answer.status_code == 400, (name, answer.text)
        assert answer.headers["Content-Type"] == "application/problem+json", name
        assert answer.json()["status"] == 400 and answer.json()["message"], name
    assert stored(gateway) == before


def test_an_unknown_caller_and_a_keyless_body_are_refused(gateway):
    keys = new_keys(1)
    stranger = post(gateway, "ext_keys", container(keys, [1], gateway.kms), name="stranger")
    assert stranger.status_code == 401 and stranger.headers["Content-Type"] == "application/problem+json"
    with gateway.kms.session() as client:
        empty = client.post(f"{gateway.interop}/kmapi/v1/ext_keys", data=b"", verify=gateway.pki.server_ca,
                            timeout=20)
    assert empty.status_code == 400


@pytest.mark.parametrize("answer", [503, None], ids=["refuses", "hangs"])
def test_an_acknowledgement_the_callback_never_takes_is_retried_then_kept_as_failed(gateway, answer):
    gateway.kms.respond(answer)
    try:
        attempts = gateway.kms.attempts
        keys = new_keys(1)
        assert post(gateway, "ext_keys", container(keys, [1], gateway.kms)).status_code == 202
        # ack_attempts is 3 in this KME's entry for the stand-in.
        failed = wait_until(lambda: gateway[1].ledger._query(
            "SELECT attempts, last_error FROM interop_acks WHERE state = 'failed' AND body LIKE ?",
            f"%{keys[0][0]}%"), timeout=30)
        assert failed[0][0] == 3 and gateway.kms.attempts >= attempts + 3
        assert ("answered HTTP 503" if answer else "did not answer in time") in failed[0][1]
    finally:
        gateway.kms.respond(200)
    # The key itself was stored: its SAE fetches it.
    assert fetch(gateway, 1, 1, [keys[0][0]]).status_code == 200


def test_a_relay_that_cannot_be_made_is_acknowledged_failed(gateway):
    # Keys of 8192 bits take 32 pads each: more than both directions of the link hold together.
    keys = new_keys(LINK_KEYS // 32 + 1, 8192 // 8)
    assert post(gateway, "ext_keys", container(keys, [1, 3], gateway.kms)).status_code == 202
    acks = gateway.kms.acks_for(keys[0][0], 2)
    assert statuses(acks) == {"1": "failed", "3": "failed"}
    assert "not enough key material" in acks[0]["message"]
    assert fetch(gateway, 1, 1, [keys[0][0]]).status_code == 400


def test_operators_see_the_foreign_kms_and_its_traffic_without_key_material(gateway):
    keys = new_keys(1)
    assert post(gateway, "ext_keys", container(keys, [1], gateway.kms)).status_code == 202
    gateway.kms.acks_for(keys[0][0])
    secrets = [keys[0][1].hex(), base64.b64encode(keys[0][1]).decode()]
    gateway[1].start("debug")
    try:
        debug = gateway[1].debug_url()
        wait_until(lambda: requests.get(debug + "/links", timeout=5).ok, 20)
        (foreign,) = [link for link in requests.get(debug + "/links", timeout=5).json() if link["interop"]]
        assert foreign["name"] == "foreign KMS foreign-kms (ETSI GS QKD 020)" and foreign["interop"]["keys"]["held"]
        metrics = requests.get(debug + "/metrics", timeout=5).text
        assert 'kme_interop_keys_total{direction="received",status="relayed"}' in metrics
        events = json.dumps(requests.get(debug + "/messages", timeout=5).json())
        assert keys[0][0] in events
    finally:
        gateway[1].stop("debug")
    status = run_cli(["kme-status"], gateway[1].config)
    assert status.returncode == 0 and "foreign KMS (ETSI GS QKD 020)" in status.stdout
    for text in (metrics, events, status.stdout, json.dumps(foreign)):
        assert not any(secret in text for secret in secrets)


def enc_keys(gateway, kme: int, sae: int, number: int = 1):
    with gateway[kme].sae(sae) as session:
        return session.post(f"{gateway[kme].url()}/keys/{FOREIGN_SAE}/enc_keys", json={"number": number}, timeout=20)


MASTERS = pytest.mark.parametrize("kme, sae", [(1, 1), (2, 3), (3, 5)], ids=[
    "a master of the gateway", "a master of the linked KME", "a master behind a trusted node"])


@MASTERS
def test_a_master_gets_keys_with_an_sae_behind_the_foreign_kms_once_it_has_them(gateway, kme, sae):
    answer = enc_keys(gateway, kme, sae, 2)
    assert answer.status_code == 200, answer.text
    for key in answer.json()["keys"]:
        passed, value = gateway.kms.passed_key(key["key_ID"])
        assert value == base64.b64decode(key["key"])
        assert (passed["initiator_sae_id"], passed["target_sae_ids"]) == (str(sae), [FOREIGN_SAE])
        assert passed["ack_callback_url"] == f"{gateway.interop}/kmapi/v1/ext_keys/ack"
    # Nothing of them stays at the gateway.
    assert gateway[1].ledger._query("SELECT COUNT(*) FROM delivered_keys WHERE key_id = ?",
                                    answer.json()["keys"][0]["key_ID"]) == [(0,)]


@MASTERS
@pytest.mark.parametrize("failure", ["failed", "silent", "refused"])
def test_a_foreign_kms_that_does_not_take_the_keys_fails_the_request(gateway, kme, sae, failure):
    gateway.kms.ack_status = {"failed": "failed", "silent": None, "refused": "relayed"}[failure]
    gateway.kms.keys_answer = 503 if failure == "refused" else 202
    passed = len(gateway.kms.passed)
    try:
        answer = enc_keys(gateway, kme, sae)
    finally:
        gateway.kms.ack_status, gateway.kms.keys_answer = "relayed", 202
    assert answer.status_code == 503, answer.text
    assert len(gateway.kms.passed) == passed + 1
    if kme == 1:
        assert {"failed": "no route to the target SAE", "silent": "acknowledged no key within 1 s",
                "refused": "answered HTTP 503"}[failure] in answer.json()["message"]
    if kme == 3:
        assert answer.json()["message"].endswith(
            "relay failed at hop KME 1 -> KME foreign-kms: foreign KMS foreign-kms did not take the keys")
    # The keys were spent at both ends of every link they crossed (the activations settled), never handed out again.
    wait_until(lambda: all(gateway[a].ledger.link(b)["reserved"] == gateway[b].ledger.link(a)["reserved"] == 0
                           for a, b in LINKS))
    for a, b in LINKS:
        gateway[a].ledger.assert_exact(b)
        gateway[b].ledger.assert_exact(a)


def test_an_acknowledgement_of_keys_never_passed_is_refused(gateway):
    answer = post(gateway, "ext_keys/ack", [{"key_ids": [{"key_id": str(uuid.uuid4())}], "ack_status": "relayed",
                                             "initiator_sae_id": "1", "target_sae_id": FOREIGN_SAE}])
    assert answer.status_code == 400 and answer.json()["message"] == "key not present"
    bad = post(gateway, "ext_keys/ack", [{"key_ids": [], "ack_status": "maybe", "initiator_sae_id": "1",
                                          "target_sae_id": FOREIGN_SAE}])
    assert bad.status_code == 400 and bad.headers["Content-Type"] == "application/problem+json"


@pytest.mark.parametrize("call, others", [
    ("activation", {1: [1]}), ("relay", {1: [1]}), ("relay", {3: [5]}), ("held relay", {})])
def test_an_sae_behind_the_foreign_kms_is_the_only_slave_of_the_keys_a_kme_brings(gateway, call, others):
    """A peer's activation or relay for the SAE behind the foreign KMS and any other slave (here or beyond), or a
    held (multicast) relay, is refused before anything changes: the gateway answers for one foreign slave only."""
    client = gateway.peer_client(2, 1)
    targets = {1: [FOREIGN_SAE, *others.get(1, [])], **{kme: saes for kme, saes in others.items() if kme != 1}}
    entry = {"key_ID": str(uuid.uuid4()), "parts": [{"file": "l12.cor", "position": 1}]}
    before = gateway[1].ledger.assert_exact(2), gateway[1].ledger.waiting()
    if call == "activation":
        body = {"activation_ID": str(uuid.uuid4()), "master_SAE_ID": 3, "slave_SAE_IDs": targets[1], "size": 256,
                "keys": [entry]}
        with pytest.raises(PeerRefused) as caught:
            client.activate(body)
        status, message = caught.value.status, caught.value.detail
    else:
        body = {"activation_ID": str(uuid.uuid4()), "relay_ID": str(uuid.uuid4()), "path": [2], "master_SAE_ID": 3,
                "size": 256, "hold": call == "held relay", "timeout_ms": 2000,
                "targets": [{"kme_ID": kme, "slave_SAE_IDs": saes} for kme, saes in targets.items()],
                "keys": [entry], "mac_part": {"file": "l12.cor", "position": 2}}
        answer = client.session.post(f"{client.base}/relays", json=body, timeout=10, headers={
            RELAY_MAC_HEADER: base64.b64encode(bytes(16)).decode()})
        status, message = answer.status_code, answer.json()["message"]
    assert status == 403
    assert f"SAE {FOREIGN_SAE} is behind a foreign KMS: it is the only slave of its " in message
    assert (gateway[1].ledger.assert_exact(2), gateway[1].ledger.waiting()) == before
