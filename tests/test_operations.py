"""The operator surface on a real KME pair: health, metrics, debugging page, logs."""
import base64
import json
import os
import re

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.network import Network
from tests.support import run_cli, wait_until


@pytest.fixture(params=["text"])
def network(request, tmp_path, pki):
    network = Network(tmp_path, pki, [(1, 2)], log_level="DEBUG", log_format=request.param)
    network.write_link_file(1, 2, "link.cor", 200)
    network.start_all()
    network[1].start("debug")
    network[2].start("debug")
    network.wait_for_link(1, 2, 200)
    yield network
    network.stop_all()


def test_health_ok_then_names_the_worker(network):
    kme1 = network[1]
    wait_until(lambda: requests.get(f"{kme1.debug_url()}/healthz", timeout=10).status_code == 200)
    sae = kme1.sae(1).get(f"https://127.0.0.1:{kme1.port('saes_https_interface')}/healthz", timeout=10)
    assert sae.status_code == 200 and sae.json()["checks"] == {
        "database": "ok", "key_directories": "ok", "ingestion_worker": "ok"}
    peer = network.peer_client(2, 1)
    assert peer.session.get(f"https://127.0.0.1:{kme1.port('kmes_https_interface')}/healthz",
                            timeout=10).status_code == 200

    kme1.stop("ingest")
    wait_until(lambda: requests.get(f"{kme1.debug_url()}/healthz", timeout=10).status_code == 503, timeout=15)
    body = requests.get(f"{kme1.debug_url()}/healthz", timeout=10).json()
    assert body["checks"]["ingestion_worker"].startswith("ingestion worker: no heartbeat")
    assert body["checks"]["database"] == "ok"


@pytest.mark.sqlite_only
def test_health_names_a_database_file_moved_away(network):
    kme1 = network[1]
    wait_until(lambda: requests.get(f"{kme1.debug_url()}/healthz", timeout=10).status_code == 200)
    database = kme1.folder / "kme.db"
    os.rename(database, database.with_suffix(".moved"))
    try:
        response = requests.get(f"{kme1.debug_url()}/healthz", timeout=10)
        assert response.status_code == 503
        assert "kme.db" in response.json()["checks"]["database"]
    finally:
        os.rename(database.with_suffix(".moved"), database)
    assert requests.get(f"{kme1.debug_url()}/healthz", timeout=10).status_code == 200


def metric_values(kme) -> dict:
    text = requests.get(f"{kme.debug_url()}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def total(values: dict, name: str, **labels) -> float:
    return sum(value for (metric, sample_labels), value in values.items()
               if metric == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()))


@pytest.mark.one_engine
def test_metrics_count_every_key_handed_out_across_workers(network):
    kme1, kme2 = network[1], network[2]
    handed = 0
    for number in (1, 2, 3, 1, 2):
        keys = kme1.sae(1).post(f"{kme1.url()}/keys/3/enc_keys", json={"number": number}, timeout=10).json()["keys"]
        handed += len(keys)
    local = kme1.sae(1).get(f"{kme1.url()}/keys/2/enc_keys", timeout=10)
    assert local.status_code == 503  # the local zone has no keys in this network
    values = metric_values(kme1)
    assert total(values, "kme_keys_delivered_total", role="master", sae="1") == handed
    assert total(values, "kme_http_requests_total", route="/api/v1/keys/<slave_sae_id>/enc_keys") == 6
    assert total(values, "kme_http_request_duration_seconds_count") >= 6
    # KME 1 arbitrates the link: every key both ends hold is its direction's until it lends some.
    assert total(values, "kme_pool_keys", link="2", state="available") == 200 - handed
    assert total(values, "kme_link_keys_total", link="2", kind="delivered") == handed
    assert total(values, "kme_direction_keys", link="2", direction="outbound", state="available") == 200 - handed
    assert total(values, "kme_pool_keys", link="2", state="unconfirmed") == 0
    # KME 2's masters borrow from KME 1's direction.
    assert kme2.sae(3).post(f"{kme2.url()}/keys/1/enc_keys", json={"number": 4}, timeout=10).status_code == 200
    assert total(metric_values(kme2), "kme_direction_keys", link="1", direction="outbound", state="leased") >= 4
    assert total(metric_values(kme1), "kme_direction_keys", link="2", direction="inbound", state="leased") >= 4
    printed = run_cli(["kme-status"], kme2.config)
    assert printed.returncode == 0, printed.stderr
    assert re.search(r"KME 2 -> KME 1\s+\d+\s+\d+\s+0", printed.stdout), printed.stdout
    assert "set aside" in printed.stdout and "unconfirmed" in printed.stdout
    assert 7 < total(values, "kme_entropy_bits_per_byte", link="2") <= 8
    wait_until(lambda: total(metric_values(kme1), "kme_peer_reachable", peer="2") == 1)
    kme2.stop("kme")
    assert kme1.sae(1).get(f"{kme1.url()}/keys/3/enc_keys", timeout=10).status_code == 503
    values = metric_values(kme1)
    assert total(values, "kme_peer_activation_failures_total", peer="2", outcome="unreachable") == 1
    assert total(metric_values(kme2), "kme_keys_waiting", link="1") == handed


# The JSON log format on both engines; the text one's lines are those of the other tests.
@pytest.mark.parametrize("network", [pytest.param("text", marks=pytest.mark.one_engine), "json"], indirect=True)
def test_no_key_material_in_logs_events_or_pages(network):
    kme1, kme2 = network[1], network[2]
    keys = kme1.sae(1).post(f"{kme1.url()}/keys/3/enc_keys", json={"number": 3, "size": 512,
                                                                    "additional_slave_SAE_IDs": ["4"]},
                            timeout=10).json()["keys"]
    keys += kme2.sae(3).get(f"{kme2.url()}/keys/1/enc_keys?number=2", timeout=10).json()["keys"]
    for sae in (3, 4):
        kme2.sae(sae).post(f"{kme2.url()}/keys/1/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]}
                                                                             for k in keys[:3]]}, timeout=10)
    kme1.sae(1).post(f"{kme1.url()}/keys/3/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys[3:]]},
                     timeout=10)
    materials = [base64.b64decode(key["key"]) for key in keys]
    forms = [f for m in materials for f in (base64.b64encode(m).decode(), m.hex(), m.hex().upper(), m[:16].hex())]
    outputs = []
    for kme in (kme1, kme2):
        for name in ("messages", "links", "metrics", ""):
            outputs.append(requests.get(f"{kme.debug_url()}/{name}", timeout=10).text)
        outputs.append("\n".join(m for (m,) in kme.ledger._query("SELECT message FROM events")))
    network.stop_all()
    logs = [path.read_text(errors="replace") for kme in (kme1, kme2) for path in kme.folder.glob("*.log")]
    lines = [line for log in logs for line in log.splitlines()]
    if network.json_logs:
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert any(r.get("route") == "/api/v1/keys/<slave_sae_id>/enc_keys" and r.get("caller") == "SAE 1"
                   and r.get("status") == 200 for r in records)
        assert any(r["logger"] == "kme.events" and r["message"].startswith(f"Key {keys[0]['key_ID']} activated")
                   for r in records)
    else:
        assert any("POST /api/v1/keys/<slave_sae_id>/enc_keys 200 SAE 1" in line for line in lines)
        assert any(f"kme.events: Key {keys[0]['key_ID']} activated" in line for line in lines)
    assert any(f"Key {keys[0]['key_ID']} activated" in output for output in outputs)
    for text in outputs + logs:
        for form in forms:
            assert form not in text
