"""The OpenAPI documents agree with the code, and fuzzing a live KME pair from them finds no server error.

The fuzzing is schemathesis against two real KMEs over mutual TLS, bounded
in examples per operation; afterwards the accounting of both KMEs is exact.
"""
import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from kme.interfaces.openapi import document
from kme.operations.certs import generate_foreign_pki
from tests.network import Network
from tests.support import ROOT, free_port, load_json, wait_until

EXAMPLES_PER_OPERATION = 25
FUZZ_SETTINGS = settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))


def test_docs_openapi_json_is_current():
    on_disk = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert on_disk == document("all"), "docs/openapi.json is stale: run `make openapi`"


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """The PKI of another vendor's KMS (kme.operations.certs.generate_foreign_pki)."""
    folder = tmp_path_factory.mktemp("foreign")
    return folder, generate_foreign_pki(folder, [1], "password")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, pki, foreign):
    """KMEs 1 and 2, linked; KME 1 serves the interop interface to the foreign KMS, which may pass keys to SAEs 1
    and 3."""
    folder, serials = foreign
    network = Network(tmp_path_factory.mktemp("fuzz"), pki, [(1, 2)])
    raw = load_json(network[1].config)
    raw["this_kme"]["interop_https_interface"] = {**raw["this_kme"]["saes_https_interface"],
                                                  "listen_address": f"127.0.0.1:{free_port()}",
                                                  "ca_client_cert_path": str(folder / "ca.crt")}
    raw["foreign_kms"] = [{"id": "foreign-kms", "https_client_certificate_serial": serials["kms"],
                           "base_url": "https://127.0.0.1:1/kmapi/v1",
                           "https_client_authentication_certificate": str(folder / "kme1-to-foreign.pfx"),
                           "https_client_authentication_certificate_password": "password",
                           "server_ca_cert_path": str(folder / "ca.crt"), "target_sae_ids": [1, 3]}]
    raw["saes"].append({"id": "foreign-sae", "kme_id": "foreign-kms"})
    network[1].config.write_text(json.dumps(raw))
    network.write_link_file(1, 2, "link.cor", 20_000)
    for kme in (1, 2):
        network.write_link_file(kme, kme, f"zone-{kme}.cor", 20_000)
    network.start_all()
    wait_until(lambda: all(network[k].ledger.link(p)["ingested"] == 20_000 for k, p in
                           ((1, 1), (1, 2), (2, 1), (2, 2))), timeout=60)
    yield network
    network.stop_all()
    for kme, peer in ((1, 1), (1, 2), (2, 1), (2, 2)):
        network[kme].ledger.assert_exact(peer)


@pytest.fixture(scope="module")
def sae1(pair):
    with pair[1].sae(1) as session:
        yield session


@pytest.fixture(scope="module")
def kme2_to_kme1(pair):
    peer = pair.peer_client(2, 1)
    yield peer.session
    peer.session.close()


@pytest.mark.one_engine
def test_each_interface_serves_its_own_document(pair, sae1, kme2_to_kme1):
    assert sae1.get(f"{pair[1].url()}/openapi.json", timeout=10).json() == document("sae")
    inter_kme = kme2_to_kme1.get(f"https://127.0.0.1:{pair[1].port('kmes_https_interface')}/api/v1/openapi.json",
                                 timeout=10)
    assert inter_kme.json() == document("kme")


def check(case, response) -> None:
    """No 5xx from input, except the standard's 503 for an exhausted pool and a relay's naming the hop that failed;
    every answer as documented."""
    if response.status_code >= 500:
        assert response.status_code == 503 and response.json()["message"].startswith(
            ("not enough key material", "relay failed at hop")), \
            (case.method, case.formatted_path, response.status_code, response.text)
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance])


# The documents come from the code: the live pair serves the same (test above).
sae_fuzz = schemathesis.openapi.from_dict(document("sae"))
kme_fuzz = schemathesis.openapi.from_dict(document("kme"))
interop_fuzz = schemathesis.openapi.from_dict(document("interop"))


@pytest.mark.one_engine
@sae_fuzz.parametrize()
@FUZZ_SETTINGS
def test_fuzz_the_sae_interface(case, pair, sae1):
    response = case.call(base_url=f"https://127.0.0.1:{pair[1].port('saes_https_interface')}", session=sae1,
                         verify=sae1.verify, cert=sae1.cert, timeout=10)
    check(case, response)


@pytest.mark.one_engine
@kme_fuzz.parametrize()
@FUZZ_SETTINGS
def test_fuzz_the_inter_kme_interface(case, pair, kme2_to_kme1):
    # Trust and the client certificate come from the peer client's own TLS context.
    response = case.call(base_url=f"https://127.0.0.1:{pair[1].port('kmes_https_interface')}",
                         session=kme2_to_kme1, verify=True, timeout=10)
    check(case, response)


@pytest.fixture(scope="module")
def foreign_kms(foreign):
    folder, _serials = foreign
    with requests.Session() as session:
        session.cert = (str(folder / "kms.crt"), str(folder / "kms.key"))
        session.trust_env = False
        yield session


@pytest.mark.one_engine
@interop_fuzz.parametrize()
@FUZZ_SETTINGS
def test_fuzz_the_interop_interface(case, pair, foreign_kms):
    response = case.call(base_url=f"https://127.0.0.1:{pair[1].port('interop_https_interface')}",
                         session=foreign_kms, verify=pair.pki.server_ca, cert=foreign_kms.cert, timeout=10)
    check(case, response)
