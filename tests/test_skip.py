"""Cisco SKIP (draft-cisco-skip-02) on two real KMEs on 127.0.0.1, driven by the `skip-qkd` client from PyPI over
mutual TLS as a router would use it, and side by side with ETSI GS QKD 014.

Router A is SAE "router-a" at KME 1, router B SAE "router-b" at KME 2; SAEs 2 and 4 keep their integer IDs.
"""
import base64
import re
import uuid

import pytest
import requests
from skip_qkd import MTLSConfig, SkipQKDClient

from kme.errors import KEYS_NOT_FOUND, SIZE_NOT_MULTIPLE_OF_8
from kme.interfaces.openapi import document
from kme.interfaces.schemas import SkipCapabilitiesSchema, SkipEntropySchema, SkipKeySchema
from tests.network import Network
from tests.support import sae_session, write_keys

# SKIP maps onto the domain calls of the SAE interface; their statements run on both engines in test_string_ids.py.
pytestmark = pytest.mark.one_engine

NAMES = {1: "router-a", 3: "router-b"}
HEX_KEY_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def network(tmp_path_factory, pki):
    network = Network(tmp_path_factory.mktemp("skip"), pki, [(1, 2)], sae_names=NAMES, skip=True)
    write_keys(network[1].link_folder(1) / "zone.cor", 20)
    network.start_with_links([(1, 2)], 200)
    yield network
    network.stop_all()


def router(network, kme: int, sae: int) -> SkipQKDClient:
    """The PyPI client as a router's configuration gives it: its Key Provider, its own ID, its certificates.
    It closes its connection after each answer: one client per call."""
    cert, key = network.pki.client(kme, sae)
    return SkipQKDClient(server_address=f"127.0.0.1:{network[kme].port('skip_https_interface')}",
                         server_id=str(NAMES.get(sae, sae)),
                         mtls_config=MTLSConfig(ca_file=network.pki.server_ca, cert_file=cert, key_file=key))


def skip_get(network, kme: int, sae: int, path: str, **params) -> requests.Response:
    return network[kme].sae(sae).get(f"{network[kme].skip_url()}{path}", params=params, timeout=10)


def test_a_key_for_a_router_behind_the_other_kme_is_fetched_there_once_by_its_key_id(network):
    made = router(network, 1, 1).request_key("router-b")
    assert HEX_KEY_ID.fullmatch(made["keyId"]) and re.fullmatch(r"[0-9a-f]{64}", made["key"])
    fetched = router(network, 2, 3).fetch_key_by_id(made["keyId"], "router-a")
    assert fetched == made
    with pytest.raises(RuntimeError, match=" 400 "):
        router(network, 2, 3).fetch_key_by_id(made["keyId"], "router-a")
    network[1].ledger.assert_exact(2)
    network[2].ledger.assert_exact(1)
    for kme in (network[1], network[2]):
        assert made["key"] not in "".join(path.read_text() for path in kme.folder.glob("*.log"))


def test_the_interface_serves_its_openapi_document_and_answers_by_it(network):
    assert skip_get(network, 1, 1, "/api/v1/openapi.json").json() == document("skip")
    made = router(network, 1, 1).request_key("router-b")
    answers = [(SkipKeySchema(), made), (SkipCapabilitiesSchema(), router(network, 1, 1).capabilities()),
               (SkipEntropySchema(), router(network, 1, 1).entropy())]
    assert [schema.validate(answer) for schema, answer in answers] == [{}, {}, {}]
    assert router(network, 2, 3).fetch_key_by_id(made["keyId"], "router-a") == made


def test_a_key_size_in_bits(network):
    made = router(network, 1, 1).request_key("router-b", size=512)
    assert len(bytes.fromhex(made["key"])) == 64
    assert router(network, 2, 3).fetch_key_by_id(made["keyId"], "router-a") == made


def test_a_key_made_through_skip_is_fetched_through_etsi_014_once(network):
    made = router(network, 1, 1).request_key("router-b")
    key_id = str(uuid.UUID(made["keyId"]))
    kme2 = network[2]
    answer = kme2.sae(3).get(f"{kme2.url()}/keys/router-a/dec_keys", params={"key_ID": key_id}, timeout=10)
    assert answer.json()["keys"] == [{"key_ID": key_id, "key": _base64(made["key"])}]
    again = skip_get(network, 2, 3, f"/key/{made['keyId']}", remoteSystemID="router-a")
    assert again.status_code == 400 and again.json() == {"message": KEYS_NOT_FOUND}


def test_a_key_made_through_etsi_014_is_fetched_through_skip_once(network):
    kme1 = network[1]
    (made,) = kme1.sae(1).get(f"{kme1.url()}/keys/router-b/enc_keys", timeout=10).json()["keys"]
    fetched = router(network, 2, 3).fetch_key_by_id(uuid.UUID(made["key_ID"]).hex, "router-a")
    assert _base64(fetched["key"]) == made["key"]
    kme2 = network[2]
    again = kme2.sae(3).get(f"{kme2.url()}/keys/router-a/dec_keys", params={"key_ID": made["key_ID"]}, timeout=10)
    assert again.status_code == 400


def test_a_key_between_a_router_and_a_numbered_sae_of_its_own_zone(network):
    made = router(network, 1, 1).request_key("2")
    # The UUID's own form is accepted as well as its 32 digits.
    assert skip_get(network, 1, 2, f"/key/{uuid.UUID(made['keyId'])}", remoteSystemID="router-a").json() == made
    network[1].ledger.assert_exact(1)


def test_capabilities_name_the_caller_and_every_sae_it_may_share_keys_with(network):
    assert router(network, 1, 1).capabilities() == {
        "entropy": True, "key": True, "algorithm": "QKD", "localSystemID": "router-a",
        "remoteSystemID": [2, "router-b", 4]}
    assert skip_get(network, 2, 4, "/capabilities").json()["localSystemID"] == 4


def test_entropy_comes_from_the_operating_system_not_from_keys(network):
    before = network[1].ledger.assert_exact(1)
    first, second = (router(network, 1, 1).entropy(minentropy=512) for _ in range(2))
    assert first["minentropy"] == 512 and len(bytes.fromhex(first["randomStr"])) == 64
    assert first["randomStr"] != second["randomStr"]
    assert len(bytes.fromhex(skip_get(network, 1, 1, "/entropy").json()["randomStr"])) == 32
    assert len(bytes.fromhex(skip_get(network, 1, 1, "/entropy", minentropy="12").json()["randomStr"])) == 2
    assert network[1].ledger.assert_exact(1) == before


@pytest.mark.parametrize("path, params, status, message", [
    ("/key", {}, 400, "remoteSystemID: missing"),
    ("/key", {"remoteSystemID": "router-z"}, 400, "SAE router-z is not known to this KME"),
    ("/key", {"remoteSystemID": "router-a"}, 400, "master and slave SAE shall differ"),
    ("/key", {"remoteSystemID": "router-b", "size": "12"}, 400, SIZE_NOT_MULTIPLE_OF_8),
    ("/key", {"remoteSystemID": "router-b", "size": "big"}, 400, "size: not an integer"),
    ("/key", {"remoteSystemID": "router-b", "number": "2"}, 400, "number: unknown query parameter"),
    ("/key", {"remoteSystemID": "router-b", "size": "262144"}, 400, "size shall be between 64 and 8192"),
    ("/key/" + "0" * 31, {"remoteSystemID": "router-b"}, 400, "keyId: not a key ID (32 hexadecimal digits)"),
    ("/key/" + "g" * 32, {"remoteSystemID": "router-b"}, 400, "keyId: not a key ID (32 hexadecimal digits)"),
    ("/key/" + "0" * 32, {}, 400, "remoteSystemID: missing"),
    ("/key/" + "0" * 32, {"remoteSystemID": "router-b"}, 400, KEYS_NOT_FOUND),
    ("/entropy", {"minentropy": "0"}, 400, "minentropy shall be between 1 and 8192"),
    ("/entropy", {"minentropy": "8193"}, 400, "minentropy shall be between 1 and 8192"),
    ("/nothing", {}, 404, "no such route: see draft-cisco-skip or this interface's OpenAPI document, "
                          "/api/v1/openapi.json"),
], ids=["no remote", "unknown remote", "itself", "size not bytes", "size not a number", "number", "size too big",
        "key ID short", "key ID not hex", "fetch without remote", "unknown key", "no entropy", "too much entropy",
        "no route"])
def test_every_mistake_gets_an_error_body_and_changes_nothing(network, path, status, message, params):
    before = network[1].ledger.assert_exact(2), network[1].ledger.waiting()
    answer = skip_get(network, 1, 1, path, **params)
    assert answer.status_code == status and answer.headers["Content-Type"] == "application/json"
    assert answer.json() == {"message": message}
    assert (network[1].ledger.assert_exact(2), network[1].ledger.waiting()) == before


def test_not_enough_keys_is_503_and_takes_nothing(network):
    before = network[1].ledger.assert_exact(1)
    # 8192 bits take 32 keys of the zone, which holds 20.
    answer = skip_get(network, 1, 1, "/key", remoteSystemID="2", size="8192")
    assert answer.status_code == 503 and answer.json()["message"].startswith("not enough key material")
    assert network[1].ledger.assert_exact(1) == before


def test_a_certificate_of_no_sae_of_this_kme_is_refused(network):
    unregistered = sae_session(network.pki, 1, 9)
    answer = unregistered.get(f"{network[1].skip_url()}/capabilities", timeout=10)
    assert answer.status_code == 401 and answer.json() == {
        "message": "the client certificate is not registered for an SAE of this KME"}
    # KME 2's SKIP interface trusts only KME 2's SAE CA.
    with pytest.raises(requests.exceptions.SSLError):
        network[1].sae(2).get(f"{network[2].skip_url()}/capabilities", timeout=10)


def _base64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()
