"""The key store's side of ETSI GS QKD 020, in process on a temporary database of the pass's engine: keys claimed,
stored and acknowledged in one transaction, replays, relays that fail or are abandoned, voids, the outbox."""
import json
import time
import uuid

import pytest
from flask import current_app

from kme import create_app
from kme.config import load_config
from kme.domain import interop as interop_domain
from kme.domain.activation import abandoned_before
from kme.errors import BadRequest, ForeignKmsFailure
from kme.storage import statements
from kme.storage.db import write_transaction
from kme.storage.keystore import interop
from kme.storage.keystore.common import DeliveredKeyMaterial
from kme.storage.keystore.interop import Container
from kme.storage.schema import ensure_schema
from tests.support import PASSWORD, Ledger, load_json, run_cli, write_config

FOREIGN = "foreign-kms"


@pytest.fixture
def store(tmp_path, pki):
    path = write_config(tmp_path, pki)
    raw = load_json(path)
    raw["this_kme"]["interop_https_interface"] = {**raw["this_kme"]["saes_https_interface"],
                                                  "listen_address": "127.0.0.1:1"}
    raw["foreign_kms"] = [{"id": FOREIGN, "https_client_certificate_serial": [7], "base_url": "https://127.0.0.1:1",
                           "https_client_authentication_certificate": str(pki.folder / "kme1" / "kme1-to-kme2.pfx"),
                           "https_client_authentication_certificate_password": PASSWORD,
                           "server_ca_cert_path": pki.server_ca, "target_sae_ids": [1, 2]}]
    raw["saes"].append({"id": "far", "kme_id": FOREIGN})
    # A linked KME: relays wait for it (connect + read timeout), so a relay is abandoned only after that.
    raw["other_kmes"] = [{"id": 2, "key_directory_to_watch": "keys-2", "inter_kme_bind_address": "127.0.0.1:1",
                          "https_client_authentication_certificate": str(pki.folder / "kme1" / "kme1-to-kme2.pfx"),
                          "https_client_authentication_certificate_password": PASSWORD,
                          "server_ca_cert_path": pki.server_ca}]
    path.write_text(json.dumps(raw))
    app = create_app(load_config(path))
    with app.app_context():
        ensure_schema()
        yield Ledger(tmp_path / "kme.db")


def keys(count: int = 2) -> list[DeliveredKeyMaterial]:
    return [DeliveredKeyMaterial(str(uuid.uuid4()), bytes([index]) * 32) for index in range(count)]


def container_of(found: list[DeliveredKeyMaterial], targets=(1,)) -> Container:
    return Container(FOREIGN, "far", tuple(targets), tuple(key.key_id for key in found), "https://127.0.0.1:1/ack")


def acks(ledger) -> list[list[dict]]:
    return [json.loads(body) for (body,) in ledger._query("SELECT body FROM interop_acks ORDER BY id")]


def test_keys_for_saes_here_are_stored_counted_and_acknowledged_at_once(store):
    found = keys()
    assert interop.claim(container_of(found, (1, 2)), found, [1, 2]) is True
    assert store.waiting() == 2
    assert store.assert_exact(FOREIGN)["delivered"] == 2
    assert [[(ack["target_sae_id"], ack["ack_status"]) for ack in body] for body in acks(store)] == [
        [("1", "relayed"), ("2", "relayed")]]
    assert {state for (state,) in store._query("SELECT state FROM interop_keys")} == {interop.HELD}


def test_a_replay_changes_nothing_but_queues_the_answer_again(store):
    found = keys()
    interop.claim(container_of(found), found, [1])
    assert interop.claim(container_of(found), found, [1]) is False
    assert store.waiting() == 2 and store.link(FOREIGN)["delivered"] == 2
    assert len(acks(store)) == 2 and acks(store)[0] == acks(store)[1]
    with pytest.raises(BadRequest):
        interop.claim(container_of(found, (2,)), found, [2])
    # Part of a container again is a replay too; with a new key beside, it is refused.
    assert interop.claim(container_of(found[:1]), found[:1], [1]) is False
    mixed = found[:1] + keys(1)
    with pytest.raises(BadRequest):
        interop.claim(container_of(mixed), mixed, [1])
    assert store.waiting() == 2


def test_a_key_id_of_our_own_is_refused(store):
    found = keys(1)
    with write_transaction() as session:
        statements.insert_delivered(session, [(found[0].key_id, 1, 1, b"x" * 60, "2026")], [])
    with pytest.raises(BadRequest):
        interop.claim(container_of(found), found, [1])
    assert store._query("SELECT COUNT(*) FROM interop_keys") == [(0,)]


def test_a_failed_relay_is_acknowledged_once_and_an_abandoned_one_is_found(store):
    found = keys()
    container = container_of(found, (1, 2))
    assert interop.claim(container, found, None) is True
    assert store.waiting() == 0
    assert sorted(row[0] for row in interop.relaying_before("9999")) == sorted([key.key_id for key in found] * 2)
    assert interop.relaying_before("2000") == []
    assert interop.fail(container, "relay failed at hop KME 1 -> KME 2") is True
    assert interop.fail(container, "again") is False
    assert [(ack["ack_status"], ack["message"]) for ack in acks(store)[0]] == [
        ("failed", "relay failed at hop KME 1 -> KME 2")] * 2
    assert interop.relaying_before("9999") == []


def test_void_erases_what_waits_and_says_what_it_could_not(store):
    waiting, fetched = keys(1), keys(1)
    for found in (waiting, fetched):
        interop.claim(container_of(found, (1, 2)), found, [1, 2])
    with write_transaction() as session:
        statements.mark_fetched(statements.driver(session), [fetched[0].key_id], 1)
        statements.mark_fetched(statements.driver(session), [fetched[0].key_id], 2)
    unknown = str(uuid.uuid4())
    outcomes = interop.void(Container(FOREIGN, "far", (1,), (waiting[0].key_id, fetched[0].key_id, unknown), "u"),
                            False)
    assert {(outcome.status, outcome.key_ids) for outcome in outcomes} == {
        ("voided", (waiting[0].key_id,)), ("failed", (fetched[0].key_id,)), ("key not present", (unknown,))}
    # SAE 2 still waits for the key voided for SAE 1 only.
    assert store._query("SELECT slave_sae_id, fetched FROM key_slaves WHERE key_id = ?", waiting[0].key_id) == [
        (1, True), (2, False)]
    interop.void(Container(FOREIGN, "far", (2,), (), "u"), True)
    assert store._query("SELECT COUNT(*) FROM delivered_keys WHERE key_id = ?", waiting[0].key_id) == [(0,)]
    store.assert_exact(FOREIGN)
    with pytest.raises(BadRequest):
        interop.void(Container(FOREIGN, "far", (1,), (unknown,), "u"), False)


def test_the_outbox_retries_then_keeps_a_failed_acknowledgement(store):
    found = keys(1)
    interop.claim(container_of(found), found, [1])
    (ack,) = interop.due_acks()
    interop.ack_retry(ack, "no answer", time.time() + 3600)
    assert interop.due_acks() == []
    store.write(("UPDATE interop_acks SET next_at = 0",))
    (ack,) = interop.due_acks()
    assert ack.attempts == 1
    interop.ack_failed(ack, FOREIGN, "no answer")
    assert interop.due_acks() == []
    summary = interop.summary()
    assert summary["failed_acks"][0][4] == "no answer"
    (figures,) = summary["by_kms"].values()
    assert figures == {"keys": {"held": 1}, "acks": {"failed": 1}}
    interop.forget_sent_acks("9999")
    assert store._query("SELECT state FROM interop_acks") == [("failed",)]


def test_keys_whose_relay_lost_its_worker_are_failed_and_acknowledged(store):
    found = keys(1)
    interop.claim(container_of(found, (1, 2)), found, None)
    config = current_app.extensions["kme"]
    interop_domain.fail_abandoned(config, abandoned_before(config))
    assert acks(store) == []
    store.write(("UPDATE interop_keys SET created_at = '2000-01-01T00:00:00.000000Z'",))
    interop_domain.fail_abandoned(config, abandoned_before(config))
    assert [(ack["target_sae_id"], ack["ack_status"], ack["initiator_sae_id"]) for ack in acks(store)[0]] == [
        ("1", "failed", "far"), ("2", "failed", "far")]


def test_keys_passed_to_the_foreign_kms_wait_for_its_acknowledgement(store):
    found = keys(2)
    with write_transaction() as session:
        interop.expect(session, FOREIGN, 1, "far", [key.key_id for key in found])
    assert interop.sent_outcome([found[0].key_id]) == {found[0].key_id: (interop.SENDING, "")}
    unknown = str(uuid.uuid4())
    assert interop.acknowledged(FOREIGN, [([found[0].key_id, unknown], interop.RELAYED, "relayed")]) == [unknown]
    assert interop.sent_outcome([found[0].key_id])[found[0].key_id][0] == interop.SENDING
    assert interop.acknowledged(FOREIGN, [([found[0].key_id], interop.RELAYED, "relayed"),
                                          ([found[1].key_id], interop.FAILED, "failed: no route")]) == []
    assert interop.sent_outcome([key.key_id for key in found]) == {
        found[0].key_id: (interop.RELAYED, "relayed"), found[1].key_id: (interop.FAILED, "failed: no route")}
    # Given up, or acknowledged once: a later acknowledgement changes nothing.
    interop.give_up([key.key_id for key in found], "not acknowledged")
    interop.acknowledged(FOREIGN, [([found[1].key_id], interop.RELAYED, "relayed")])
    assert interop.sent_outcome([found[1].key_id])[found[1].key_id][0] == interop.FAILED
    assert interop.acknowledged("other", [([found[0].key_id], interop.RELAYED, "relayed")]) == [found[0].key_id]
    interop.forget_sent("9999")
    assert interop.sent_outcome([key.key_id for key in found]) == {}


def test_keys_a_peer_activated_for_an_sae_behind_the_foreign_kms_are_opened_then_erased(store):
    found = keys(1)
    interop.claim(container_of(found), found, [1])
    (opened,) = interop.prepare_hand_over(FOREIGN, "far", 1, [found[0].key_id])
    assert opened == found[0]
    assert interop.sent_outcome([found[0].key_id]) == {found[0].key_id: (interop.SENDING, "")}
    # Asked again (a retried activation or relay): nothing to pass again, recorded once.
    assert interop.prepare_hand_over(FOREIGN, "far", 1, [found[0].key_id]) == []
    assert interop.sent_outcome([found[0].key_id]) == {found[0].key_id: (interop.SENDING, "")}
    interop.handed_over([found[0].key_id])
    assert store.waiting() == 0 and interop.prepare_hand_over(FOREIGN, "far", 1, [found[0].key_id]) == []
    store.assert_exact(FOREIGN)


def test_a_hand_over_asked_again_never_passes_a_key_twice(store):
    """A retried activation or relay for the SAE behind the foreign KMS: keys passed before are not passed again;
    the retry succeeds only once the foreign KMS acknowledged them (no call to it is made here)."""
    found = keys(1)
    interop.claim(container_of(found), found, [1])
    assert interop.prepare_hand_over(FOREIGN, "far", 1, [found[0].key_id]) == [found[0]]
    config = current_app.extensions["kme"]
    with pytest.raises(ForeignKmsFailure, match="has not acknowledged the keys passed before"):
        interop_domain.hand_over_activated(config, 1, "far", [found[0].key_id])
    assert store.waiting() == 1
    assert interop.acknowledged(FOREIGN, [([found[0].key_id], interop.RELAYED, "relayed")]) == []
    interop_domain.hand_over_activated(config, 1, "far", [found[0].key_id])
    assert store.waiting() == 0
    store.assert_exact(FOREIGN)


def test_a_database_restored_from_a_backup_erases_the_foreign_keys_waiting_too(store, tmp_path):
    """A key a foreign KMS passed may have been fetched since the backup: like every waiting key, it goes."""
    found = keys(1)
    interop.claim(container_of(found), found, [1])
    result = run_cli(["restored-from-backup", "--force"], tmp_path / "config.json")
    assert result.returncode == 0, result.stderr
    assert f"link {FOREIGN}: 0 keys set aside, 1 keys waiting for their slaves erased" in result.stdout
    assert store.waiting() == 0
    store.assert_exact(FOREIGN)
