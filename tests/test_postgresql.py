"""What only PostgreSQL has: a server that can cut a connection, refuse a password or be down; its password never
leaves the configuration."""
import json
import threading

import pytest
import requests

from tests import support
from tests.network import Network
from tests.postgres import PASSWORD
from tests.support import (
    Ledger,
    free_port,
    run_cli,
    sae_port,
    sae_session,
    start_sae_interface,
    wait_until,
    write_config,
    write_keys,
)

pytestmark = pytest.mark.postgresql_only


@pytest.fixture
def kme(tmp_path, pki):
    config = write_config(tmp_path, pki)
    write_keys(tmp_path / "keys" / "a.cor", 50)
    assert run_cli(["ingest-keys"], config).returncode == 0
    server = start_sae_interface(config, tmp_path / "sae.log")
    yield config, f"https://127.0.0.1:{sae_port(config)}/api/v1"
    server.stop()


def test_a_connection_lost_in_the_middle_of_a_claim_is_a_503_and_loses_no_key(kme, pki, tmp_path):
    config, url = kme
    ledger = Ledger(tmp_path / "kme.db")
    before = ledger.assert_exact(1)
    with ledger.connect(read_only=False) as holder, ledger.connect(read_only=False) as operator:
        # The claim takes its keys, then waits to count them on the link's row, which this transaction holds.
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM links WHERE peer_kme_id = 1 FOR UPDATE")
        answers = []
        asking = threading.Thread(target=lambda: answers.append(sae_session(pki, 1, 1).post(
            f"{url}/keys/2/enc_keys", json={"number": 3}, timeout=20)))
        asking.start()
        query = ("SELECT pid FROM pg_stat_activity WHERE application_name = 'kme' AND wait_event_type = 'Lock' "
                 "AND query LIKE 'UPDATE links%'")
        (pid,), = wait_until(lambda: operator.execute(query).fetchall())
        operator.execute("SELECT pg_terminate_backend(%s)", (pid,))
        asking.join()
        holder.execute("ROLLBACK")
    assert answers[0].status_code == 503
    assert answers[0].json() == {
        "message": "key data access error: the database server is shutting down or restarting"}
    assert ledger.assert_exact(1) == before and ledger.waiting() == 0
    # The worker opens a fresh connection: the next request is served.
    again = sae_session(pki, 1, 1).post(f"{url}/keys/2/enc_keys", json={"number": 3}, timeout=20)
    assert again.status_code == 200 and ledger.assert_exact(1)["delivered"] == 3


def test_an_unreachable_server_is_named_by_every_surface(tmp_path, pki):
    uri = f"postgresql+psycopg://kme@127.0.0.1:{free_port()}/kme"
    config = write_config(tmp_path, pki, db_uri=uri)
    server = start_sae_interface(config, tmp_path / "sae.log")
    try:
        url = f"https://127.0.0.1:{sae_port(config)}"
        answer = sae_session(pki, 1, 1).get(f"{url}/api/v1/keys/2/status", timeout=20)
        assert answer.status_code == 503
        assert answer.json() == {"message": "key data access error: the database server cannot be reached"}
        health = sae_session(pki, 1, 1).get(f"{url}/healthz", timeout=20)
        assert health.status_code == 503 and health.json()["checks"]["database"].startswith(
            "writes fail: the database server cannot be reached")
    finally:
        server.stop()
    line = run_cli(["kme-status"], config)
    assert line.returncode == 1 and line.stderr.strip() == "Error: the database server cannot be reached"


def test_the_password_never_leaves_the_configuration(tmp_path, pki):
    network = Network(tmp_path, pki, [(1, 2)], log_level="DEBUG")
    kme1 = network[1]
    # The password in the URI itself, not in the passfile.
    uri = support.database_of(kme1.folder).split("?", 1)[0].replace("://kme@", f"://kme:{PASSWORD}@")
    raw = support.load_json(kme1.config)
    raw["this_kme"]["db_uri"] = uri
    kme1.config.write_text(json.dumps(raw))
    network.write_link_file(1, 2, "link.cor", 20)
    try:
        network.start_all()
        kme1.start("debug")
        network.wait_for_link(1, 2, 20)
        assert kme1.sae(1).get(f"{kme1.url()}/keys/3/enc_keys", timeout=10).status_code == 200
        pages = [requests.get(f"{kme1.debug_url()}/{name}", timeout=10).text
                 for name in ("", "messages", "links", "metrics", "healthz")]
        status = run_cli(["kme-status"], kme1.config)
        assert status.returncode == 0
    finally:
        network.stop_all()
    logs = [path.read_text(errors="replace") for path in kme1.folder.glob("*.log")]
    assert any("ingested" in log.lower() for log in logs)
    for text in [*pages, *logs, status.stdout, status.stderr]:
        assert PASSWORD not in text

    wrong = uri.replace(f":{PASSWORD}@", ":not-the-password@")
    raw["this_kme"]["db_uri"] = wrong
    kme1.config.write_text(json.dumps(raw))
    refused = run_cli(["kme-status"], kme1.config)
    assert refused.returncode == 1
    assert refused.stderr.strip() == "Error: the database refused the KME's credentials"
    assert "not-the-password" not in refused.stderr


def test_the_password_may_come_from_the_environment(tmp_path, pki, monkeypatch):
    # The URI names neither a password nor a passfile.
    uri = support.database_of(tmp_path).split("?", 1)[0]
    config = write_config(tmp_path, pki, db_uri=uri)
    write_keys(tmp_path / "keys" / "a.cor", 5)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "absent"))
    refused = run_cli(["ingest-keys"], config)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == "Error: the database refused the KME's credentials"
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    result = run_cli(["ingest-keys"], config)
    assert result.returncode == 0 and "5 keys" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
