"""The ETSI GS QKD 020 interop interface, first part: a real gunicorn over TLS that knows a foreign KMS by its
client certificate (issued by the foreign vendor's own CA, made here), serves the versions, and answers every
refusal with an RFC 7807 problem."""
import json

import pytest
import requests

from kme.config import load_config
from kme.errors import ConfigError
from kme.interfaces import gunicorn_conf
from kme.interfaces.interop_schemas import ProblemSchema
from kme.interfaces.openapi import document
from kme.operations.certs import generate_pki
from tests.support import PASSWORD, free_port, load_json, sae_session, start_interop_interface, write_config

# The interface sits above the storage layer.
pytestmark = pytest.mark.one_engine


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """The foreign vendor's PKI: its CA (its kme1/ca_saes), the certificate of its KMS and of a stranger."""
    folder = tmp_path_factory.mktemp("foreign")
    serials = generate_pki(folder, {1: ["foreign-kms", "stranger"]}, PASSWORD)
    return folder, serials


def interop_config(folder, pki, foreign_pki) -> dict:
    path, serials = foreign_pki
    config = write_config(folder, pki)
    raw = load_json(config)
    raw["this_kme"]["interop_https_interface"] = {
        "listen_address": f"127.0.0.1:{free_port()}", "ca_client_cert_path": str(path / "kme1" / "ca_saes.crt"),
        "server_cert_path": str(pki.folder / "kme1" / "kme_server.crt"),
        "server_key_path": str(pki.folder / "kme1" / "kme_server.key")}
    raw["foreign_kms"] = [{
        "id": "foreign-kms", "https_client_certificate_serial": serials["foreign-kms"],
        "base_url": "https://127.0.0.1:20020/kmapi/v1",
        "https_client_authentication_certificate": str(pki.folder / "kme1" / "kme1-to-kme2.pfx"),
        "https_client_authentication_certificate_password": PASSWORD,
        "server_ca_cert_path": str(path / "ca_servers.crt")}]
    config.write_text(json.dumps(raw))
    return raw


@pytest.fixture(scope="module")
def interop(tmp_path_factory, pki, foreign):
    folder = tmp_path_factory.mktemp("kme")
    raw = interop_config(folder, pki, foreign)
    process = start_interop_interface(folder / "config.json", folder / "interop.log")
    yield f"https://{raw['this_kme']['interop_https_interface']['listen_address']}"
    process.stop()


def session(foreign, name: str) -> requests.Session:
    path, _ = foreign
    client = requests.Session()
    client.cert = (str(path / "kme1" / f"{name}.crt"), str(path / "kme1" / f"{name}.key"))
    client.trust_env = False
    return client


def test_the_foreign_kms_learns_the_versions(interop, foreign, pki):
    answer = session(foreign, "foreign-kms").get(f"{interop}/kmapi/versions", verify=pki.server_ca, timeout=10)
    assert answer.status_code == 200 and answer.json() == {"versions": ["v1"]}


def test_a_certificate_of_the_foreign_ca_that_names_no_foreign_kms_gets_a_problem(interop, foreign, pki):
    answer = session(foreign, "stranger").get(f"{interop}/kmapi/versions", verify=pki.server_ca, timeout=10)
    assert answer.status_code == 401 and answer.headers["Content-Type"] == "application/problem+json"
    assert answer.json() == {"type": "about:blank", "title": "Unauthorized", "status": 401,
                             "detail": "the client certificate is not registered for a foreign KMS of this KME",
                             "message": "the client certificate is not registered for a foreign KMS of this KME"}
    assert ProblemSchema().validate(answer.json()) == {}


def test_no_route_is_a_problem_too_and_the_interface_serves_its_openapi_document(interop, foreign, pki):
    client = session(foreign, "foreign-kms")
    missing = client.get(f"{interop}/kmapi/v2/ext_keys", verify=pki.server_ca, timeout=10)
    assert missing.status_code == 404 and missing.headers["Content-Type"] == "application/problem+json"
    assert missing.json()["detail"].startswith("no such route: see ETSI GS QKD 020")
    assert client.get(f"{interop}/api/v1/openapi.json", verify=pki.server_ca, timeout=10).json() == \
        document("interop")


def test_an_sae_certificate_does_not_reach_the_interop_interface(interop, pki):
    with pytest.raises(requests.exceptions.SSLError):
        sae_session(pki, 1, 1).get(f"{interop}/kmapi/versions", timeout=10)


@pytest.mark.parametrize("change, expected", [
    (lambda raw: raw["foreign_kms"][0].update(id=1), "foreign_kms[0].id: 1 names a KME or another foreign KMS"),
    (lambda raw: raw["foreign_kms"].append(dict(raw["foreign_kms"][0], id="other")),
     "foreign_kms[1].https_client_certificate_serial: duplicate serial"),
    (lambda raw: raw["foreign_kms"][0].update(base_url="http://127.0.0.1:1/kmapi"),
     "foreign_kms[0].base_url: not an https:// URL"),
    (lambda raw: raw["foreign_kms"][0].pop("https_client_certificate_serial"),
     "foreign_kms[0].https_client_certificate_serial: missing"),
    (lambda raw: raw["foreign_kms"][0].update(server_ca_cert_path="nowhere.crt"),
     "foreign_kms[0].server_ca_cert_path: not found"),
    (lambda raw: raw["foreign_kms"][0].update(target_sae_ids=[9]),
     "foreign_kms[0].target_sae_ids: 9 is not an SAE of this KME's network"),
    (lambda raw: raw["saes"].append({"id": "far", "kme_id": "other-kms"}), "saes[2].kme_id: unknown KME other-kms"),
    (lambda raw: raw["foreign_kms"][0].update(ack_attempts=0), "foreign_kms[0].ack_attempts: between 1 and 1000"),
], ids=["a KME's ID", "duplicate serial", "plain http", "no serial", "no server CA", "an unknown target",
        "an SAE behind an unknown KMS", "no attempt"])
def test_each_mistake_of_a_foreign_kms_is_one_line(tmp_path, pki, foreign, change, expected):
    raw = interop_config(tmp_path, pki, foreign)
    change(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "config.json")
    assert str(caught.value).startswith(expected)


@pytest.mark.parametrize("address", ["0.0.0.0:18998", "1.2.3.4:18998"], ids=["a wildcard", "a public address"])
def test_the_interop_interface_stays_inside_the_trusted_node(tmp_path, pki, foreign, address, monkeypatch):
    raw = interop_config(tmp_path, pki, foreign)
    raw["this_kme"]["interop_https_interface"]["listen_address"] = address
    raw["foreign_kms"][0]["ack_callback_url"] = "https://127.0.0.1:18998/kmapi/v1/ext_keys/ack"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    monkeypatch.setenv("KME_CONFIG", str(tmp_path / "config.json"))
    # What deploy/interop.py does when gunicorn reads it.
    with pytest.raises(SystemExit) as stopped:
        gunicorn_conf.settings("interop_https_interface")
    assert str(stopped.value.code).startswith(
        f"kme: this_kme.interop_https_interface: {address} is neither loopback nor a private address")
