"""String SAE and KME IDs beside integer ones, across three real KMEs on 127.0.0.1 (a line: relays through the
middle one, leases between the ends of each link).

KME 1 is "kme-alpha" and KME 3 "kme.gamma~3"; KME 2 keeps the integer 2. SAEs 1, 3 and 5 have names, SAEs 2 and
4 keep their integers. Every answer, message and event carries each ID as configured.
"""
import json
import urllib.request

import pytest

from kme import ids
from kme.errors import KEYS_NOT_FOUND
from tests.network import Network, line_routes
from tests.support import (
    Ledger,
    load_json,
    run_cli,
    sae_port,
    sae_session,
    start_debug_page,
    start_sae_interface,
    wait_until,
    write_config,
    write_keys,
)

KMES = {1: "kme-alpha", 3: "kme.gamma~3"}
SAES = {1: "alice-app", 3: "CONSB", 5: "sae_5"}
KEYS = 200


@pytest.fixture(scope="module")
def network(tmp_path_factory, pki):
    network = Network(tmp_path_factory.mktemp("names"), pki, [(1, 2), (2, 3)], routes=line_routes([1, 2, 3]),
                      kme_names=KMES, sae_names=SAES, workers=1)
    write_keys(network[1].link_folder(1) / "zone.cor", 20)
    network.start_with_links([(1, 2), (2, 3)], KEYS)
    yield network
    network.stop_all()


def name(sae: int):
    return SAES.get(sae, sae)


def take(network, kme: int, master: int, slave: int, **body) -> list[dict]:
    answer = network[kme].sae(master).post(f"{network[kme].url()}/keys/{name(slave)}/enc_keys", json=body,
                                           timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["keys"]


def fetch(network, kme: int, slave: int, master: int, keys: list[dict]):
    return network[kme].sae(slave).post(f"{network[kme].url()}/keys/{name(master)}/dec_keys",
                                        json={"key_IDs": [{"key_ID": key["key_ID"]} for key in keys]}, timeout=10)


def events(kme) -> list[str]:
    return [message for (message,) in kme.ledger._query("SELECT message FROM events ORDER BY id")]


def test_info_me_gives_each_sae_its_id_as_configured(network):
    kme1 = network[1]
    assert kme1.sae(1).get(f"{kme1.url()}/sae/info/me", timeout=10).json() == {"SAE_ID": "alice-app"}
    assert kme1.sae(2).get(f"{kme1.url()}/sae/info/me", timeout=10).json() == {"SAE_ID": 2}


def test_status_names_both_kmes_and_saes_as_configured(network):
    kme1 = network[1]
    status = kme1.sae(1).get(f"{kme1.url()}/keys/CONSB/status", timeout=10).json()
    assert (status["source_KME_ID"], status["target_KME_ID"], status["master_SAE_ID"], status["slave_SAE_ID"]) == (
        "kme-alpha", "2", "alice-app", "CONSB")
    relayed = kme1.sae(2).get(f"{kme1.url()}/keys/sae_5/status", timeout=10).json()
    assert (relayed["target_KME_ID"], relayed["master_SAE_ID"]) == ("kme.gamma~3", "2")
    # The link's keys went to the arbiter, KME 2 (integers come first); "kme-alpha" borrows them on demand, and
    # counts them once the arbiter said how many it holds free (its next progress exchange: the network's start
    # waits for the link's keys, not for that).
    wait_until(lambda: kme1.sae(1).get(f"{kme1.url()}/keys/CONSB/status", timeout=10).json()["stored_key_count"]
               == KEYS)


def test_a_key_between_a_named_and_a_numbered_kme_is_fetched_once(network):
    keys = take(network, 1, 1, 3, number=2)
    assert fetch(network, 2, 3, 1, keys).json()["keys"] == keys
    again = fetch(network, 2, 3, 1, keys)
    assert again.status_code == 400 and again.json() == {"message": KEYS_NOT_FOUND}
    # A numbered master: its slave at the other KME names it by its number, as a string.
    back = take(network, 2, 4, 1)
    assert fetch(network, 1, 1, 4, back).json()["keys"] == back
    assert f"Key {keys[0]['key_ID']} activated between SAEs alice-app and CONSB" in events(network[2])
    assert f"SAE alice-app requested key {back[0]['key_ID']} (from 4)" in events(network[1])
    # "kme-alpha" does not arbitrate: what it handed out it borrowed from KME 2's direction.
    assert "Borrowed" in " ".join(events(network[1]))
    network[1].ledger.assert_exact(2)
    network[2].ledger.assert_exact("kme-alpha")


def test_the_url_master_must_be_the_keys_master_whatever_its_form(network):
    keys = take(network, 1, 1, 3)
    wrong = fetch(network, 2, 3, 2, keys)
    assert wrong.status_code == 400 and wrong.json() == {"message": KEYS_NOT_FOUND}
    named = network[2].sae(3).post(f"{network[2].url()}/keys/alice-app/dec_keys", json={"key_IDs": [
        {"key_ID": keys[0]["key_ID"], "master_SAE_ID": "alice-app"}]}, timeout=10)
    assert named.json()["keys"] == keys


def test_multicast_to_a_named_and_a_numbered_slave_at_the_peer_and_one_here(network):
    keys = take(network, 1, 1, 3, additional_slave_SAE_IDs=[4, "2"], number=2)
    for kme, slave in ((2, 3), (2, 4), (1, 2)):
        assert fetch(network, kme, slave, 1, keys).json()["keys"] == keys
    assert fetch(network, 2, 4, 1, keys).status_code == 400


def test_a_relay_from_a_named_kme_through_a_numbered_one_to_a_named_one(network):
    keys = take(network, 1, 1, 5, number=3)
    assert fetch(network, 3, 5, 1, keys).json()["keys"] == keys
    back = take(network, 3, 5, 2)
    assert fetch(network, 1, 2, 5, back).json()["keys"] == back
    arrived = [event for event in events(network[3]) if event.startswith(f"Key {keys[0]['key_ID']} relayed from")]
    assert len(arrived) == 1 and arrived[0].startswith(f"Key {keys[0]['key_ID']} relayed from KME kme-alpha ")
    assert arrived[0].endswith("activated between SAEs alice-app and sae_5")
    network[2].ledger.assert_exact("kme.gamma~3")
    network[3].ledger.assert_exact(2)


def test_the_zone_serves_a_named_master_and_a_numbered_slave(network):
    keys = take(network, 1, 1, 2, size=512)
    assert fetch(network, 1, 2, 1, keys).json()["keys"] == keys
    assert f"Key {keys[0]['key_ID']} activated between SAEs alice-app and 2" in events(network[1])


def test_unknown_names_are_refused_as_unknown_numbers_are(network):
    kme1 = network[1]
    for slave in ("bob-app", "CONSA", "kme-alpha", "9"):
        answer = kme1.sae(1).get(f"{kme1.url()}/keys/{slave}/status", timeout=10)
        assert answer.status_code == 400 and answer.json() == {"message": f"SAE {slave} is not known to this KME"}
    bad = kme1.sae(1).post(f"{kme1.url()}/keys/CONSB/enc_keys", json={"additional_slave_SAE_IDs": ["a/b"]},
                           timeout=10)
    assert bad.status_code == 400 and bad.json()["message"] == "additional_slave_SAE_IDs[0]: not an SAE ID"


def test_operators_see_the_ids_as_configured(network):
    report = run_cli(["kme-status"], network[2].config)
    assert report.returncode == 0, report.stderr
    assert "kme-alpha" in report.stdout and "kme.gamma~3" in report.stdout and "alice-app" in report.stdout
    kme2 = network[2]
    page = start_debug_page(kme2.config, kme2.folder / "debug.log")
    try:
        with urllib.request.urlopen(f"{kme2.debug_url()}/links", timeout=10) as answer:
            links = json.load(answer)
        with urllib.request.urlopen(f"{kme2.debug_url()}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
    finally:
        page.stop()
    assert {link["link"] for link in links} == {2, "kme-alpha", "kme.gamma~3"}
    assert 'link="kme-alpha"' in metrics
    assert str(ids.number("kme-alpha")) not in json.dumps(links) + metrics


@pytest.mark.sqlite_only
def test_the_databases_store_every_id_as_a_number(network):
    """SQLite would keep a string in an integer column: every ID must have passed its column's type."""
    columns = {"links": "peer_kme_id", "key_files": "link_id", "pool_keys": "link_id", "delivered_keys":
               "link_id, master_sae_id", "key_slaves": "slave_sae_id", "outgoing_activations": "link_id",
               "incoming_activations": "link_id", "leases": "link_id", "pool_levels": "link_id",
               "peer_status": "peer_kme_id"}
    for kme in (network[1], network[2], network[3]):
        for table, names in columns.items():
            for column in names.split(", "):
                assert kme.ledger._query(f"SELECT COUNT(*) FROM {table} WHERE typeof({column}) != 'integer'") == \
                    [(0,)], (kme.name, table, column)
    assert network[1].ledger._query("SELECT COUNT(*) FROM links WHERE peer_kme_id = ?",
                                    ids.number("kme-alpha")) == [(1,)]


def test_a_database_of_the_previous_release_carries_over_and_gains_string_ids(tmp_path, pki):
    """No migration to run: integer IDs are stored as they were, so a database that waits with keys for integer
    SAEs serves them unchanged, and SAEs with string IDs join beside them."""
    config = write_config(tmp_path / "kme", pki)
    write_keys(config.parent / "keys" / "zone.cor", 10)
    assert run_cli(["ingest-keys"], config).returncode == 0
    url = f"https://127.0.0.1:{sae_port(config)}/api/v1"
    before = start_sae_interface(config, tmp_path / "before.log", workers=1)
    try:
        waiting = sae_session(pki, 1, 1).get(f"{url}/keys/2/enc_keys", timeout=10).json()["keys"]
    finally:
        before.stop()
    ledger = Ledger(config.parent / "kme.db")
    version = ledger._query("SELECT version_num FROM alembic_version")

    raw = load_json(config)
    raw["saes"].append({"id": "alice-app", "kme_id": 1, "https_client_certificate_serial": pki.serials["sae9"]})
    config.write_text(json.dumps(raw))
    after = start_sae_interface(config, tmp_path / "after.log", workers=1)
    try:
        old = sae_session(pki, 1, 2).get(f"{url}/keys/1/dec_keys", params={"key_ID": waiting[0]["key_ID"]},
                                         timeout=10)
        assert old.json()["keys"] == waiting
        alice = sae_session(pki, 1, 9)
        assert alice.get(f"{url}/sae/info/me", timeout=10).json() == {"SAE_ID": "alice-app"}
        keys = alice.get(f"{url}/keys/2/enc_keys", timeout=10).json()["keys"]
        fetched = sae_session(pki, 1, 2).get(f"{url}/keys/alice-app/dec_keys", params={"key_ID": keys[0]["key_ID"]},
                                             timeout=10)
        assert fetched.json()["keys"] == keys
    finally:
        after.stop()
    ledger.assert_exact(1)
    assert ledger._query("SELECT version_num FROM alembic_version") == version
