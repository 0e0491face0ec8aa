"""The debugging page through the Flask test client, its gunicorn guard, logs and kme-status."""
import json
import logging
import subprocess
import sys

import pytest

from kme import create_app
from kme.config import load_config
from kme.operations.logs import JsonLines
from tests.conftest import client_with, sae_environ
from tests.support import ROOT, bare_environment, run_cli, write_config, write_keys


@pytest.fixture
def debug(app):
    return create_app(app.extensions["kme"], interface="debug").test_client()


def test_messages_are_datetime_and_message_with_the_nickname(sae1, debug):
    key = sae1.get("/api/v1/keys/2/enc_keys").get_json()["keys"][0]
    events = debug.get("/messages").get_json()
    assert set(events[-1]) == {"datetime", "message"}
    assert events[-1]["message"] == f"[Test1] Key {key['key_ID']} activated between SAEs 1 and 2"
    assert events[-1]["datetime"].endswith("Z")
    assert key["key"] not in json.dumps(events)


def test_links_and_page(sae1, debug):
    sae1.get("/api/v1/keys/2/enc_keys?number=2")
    (link,) = debug.get("/links").get_json()
    assert (link["name"], link["available"], link["delivered"], link["waiting"], link["last_file"]) == (
        "local zone", 62, 2, 2, "a.cor")
    page = debug.get("/").get_data(as_text=True)
    assert "Test1" in page and "debug.js" in page and "debug.css" in page
    with debug.get("/static/debug.css") as stylesheet:
        assert stylesheet.status_code == 200 and b"font" in stylesheet.data


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:8080", "[::1]:8080"])
def test_the_debugging_page_answers_for_this_host(debug, host):
    assert debug.get("/links", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("path", ["/", "/links", "/messages", "/metrics", "/healthz"])
def test_the_debugging_page_refuses_another_host_name_dns_rebinding(debug, path):
    refused = debug.get(path, headers={"Host": "attacker.example:8080"})
    assert refused.status_code == 403
    assert refused.get_json() == {"message": "the debugging page answers requests for this host only, not for "
                                             "'attacker.example:8080'"}


def test_debug_app_has_no_sae_routes(debug):
    response = debug.get("/api/v1/keys/2/enc_keys")
    assert response.status_code == 404 and response.get_json()["message"]


def test_gunicorn_refuses_a_non_loopback_debugging_address(tmp_path, pki):
    config = write_config(tmp_path, pki, debugging_http_interface="0.0.0.0:18999")
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "deploy/debug.py", "wsgi:debug_app"], cwd=ROOT,
                            env=bare_environment(config), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "not a loopback address" in result.stderr and "Traceback" not in result.stderr


def test_json_lines_carry_the_request_fields():
    record = logging.LogRecord("kme.request", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
    record.fields = {"route": "/x", "status": 200}
    line = json.loads(JsonLines().format(record))
    assert (line["message"], line["route"], line["status"], line["level"]) == ("GET /x", "/x", 200, "INFO")


def test_kme_status_prints_pools_and_saes(tmp_path, pki):
    config = write_config(tmp_path, pki)
    write_keys(tmp_path / "keys" / "a.cor", 5)
    assert run_cli(["ingest-keys"], config).returncode == 0
    result = run_cli(["kme-status"], config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    zone = next(line for line in lines if line.startswith("local zone"))
    assert zone.split()[2:4] == ["5", "0"]
    serial = format(int.from_bytes(bytes(pki.serials["sae1"]), "big"), "X")
    assert any(line.split() == ["1", "1", serial] for line in lines)


def test_health_of_an_in_memory_kme(tmp_path, pki):
    config = write_config(tmp_path, pki, sqlite_db_path=":memory:")
    app = create_app(load_config(config))
    response = client_with(app, sae_environ(pki, "sae1")).get("/healthz")
    assert response.status_code == 200 and response.get_json()["status"] == "ok"


def test_unreadable_key_directory_is_unhealthy(app, sae1, config_path):
    (config_path.parent / "keys").rename(config_path.parent / "elsewhere")
    response = sae1.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["key_directories"].startswith("not readable")
