"""The SAE interface through Flask's test client: every rule and error path of the standard."""
import base64
import json
import time
import uuid

import pytest

from kme import create_app
from kme.config import load_config
from kme.errors import EXTENSION_MANDATORY_UNSUPPORTED, KEYS_NOT_FOUND, SIZE_NOT_MULTIPLE_OF_8
from kme.interfaces.schemas import EntropySchema, KeyContainerSchema, StatusSchema, key_container, status_body
from kme.storage.keystore.common import DeliveredKeyMaterial
from tests.conftest import client_with, sae_environ
from tests.support import Ledger, write_config

STATUS_FIELDS = {
    "source_KME_ID": str, "target_KME_ID": str, "master_SAE_ID": str, "slave_SAE_ID": str, "key_size": int,
    "stored_key_count": int, "max_key_count": int, "max_key_per_request": int, "max_key_size": int,
    "min_key_size": int, "max_SAE_ID_count": int,
}


@pytest.fixture
def ledger(config_path):
    return Ledger(config_path.parent / "kme.db")


def assert_error(response, status: int, message: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body["message"], str) and body["message"]
    if message is not None:
        assert body["message"] == message
    return body


def test_status_has_every_field_with_the_standard_type(sae1):
    body = sae1.get("/api/v1/keys/2/status").get_json()
    assert set(body) == set(STATUS_FIELDS)
    for name, kind in STATUS_FIELDS.items():
        assert type(body[name]) is kind, name
    assert (body["source_KME_ID"], body["target_KME_ID"], body["master_SAE_ID"], body["slave_SAE_ID"]) == (
        "1", "1", "1", "2")
    assert body["stored_key_count"] == 64


def test_get_key_then_key_ids_round_trip_with_size_over_256(sae1, sae2, ledger):
    keys = sae1.post("/api/v1/keys/2/enc_keys", json={"number": 3, "size": 520}).get_json()["keys"]
    assert len(keys) == 3
    assert all(len(base64.b64decode(key["key"])) == 65 for key in keys)
    # 520 bits take three 256-bit pool keys each; the unused bits are gone with them.
    assert sae1.get("/api/v1/keys/2/status").get_json()["stored_key_count"] == 64 - 9
    fetched = sae2.post("/api/v1/keys/1/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]})
    assert fetched.get_json()["keys"] == keys
    assert ledger.assert_exact(1) == {"ingested": 64, "available": 55, "reserved": 0, "peer_held": 0,
                                      "unconfirmed": 0, "delivered": 9, "discarded": 0, "set_aside": 0}
    assert ledger.waiting() == 0


def test_size_under_256_truncates_one_pool_key(sae1):
    keys = sae1.get("/api/v1/keys/2/enc_keys?size=64").get_json()["keys"]
    assert len(base64.b64decode(keys[0]["key"])) == 8
    assert sae1.get("/api/v1/keys/2/status").get_json()["stored_key_count"] == 63


def test_key_ids_are_uuid7_time_and_randomness_only(sae1):
    before = time.time_ns() // 1_000_000
    keys = sae1.get("/api/v1/keys/2/enc_keys?number=5").get_json()["keys"]
    ids = [uuid.UUID(key["key_ID"]) for key in keys]
    assert all(key_id.version == 7 and key_id.variant == uuid.RFC_4122 for key_id in ids)
    assert all(before <= key_id.int >> 80 <= time.time_ns() // 1_000_000 for key_id in ids)
    assert len({key_id.int & ((1 << 74) - 1) for key_id in ids}) == 5


def test_keys_are_consecutive_pool_keys_in_file_order(sae1, config_path):
    data = (config_path.parent / "keys" / "a.cor").read_bytes()
    first = sae1.post("/api/v1/keys/2/enc_keys", json={"size": 512}).get_json()["keys"][0]
    assert base64.b64decode(first["key"]) == data[:64]


def test_extension_optional_is_ignored_and_the_request_served(sae1):
    response = sae1.post("/api/v1/keys/2/enc_keys", json={"extension_optional": [{"abc_route_type": "direct"}]})
    assert response.status_code == 200
    assert len(response.get_json()["keys"]) == 1


def test_empty_extension_mandatory_is_served(sae1):
    assert sae1.post("/api/v1/keys/2/enc_keys", json={"extension_mandatory": []}).status_code == 200


def test_unsupported_extension_mandatory_lists_each_name(sae1, ledger):
    response = sae1.post("/api/v1/keys/2/enc_keys", json={
        "extension_mandatory": [{"abc_route_type": "direct"}, {"abc_transfer_method": "qkd"}]})
    body = assert_error(response, 400, EXTENSION_MANDATORY_UNSUPPORTED)
    assert body["details"] == [
        {"extension_mandatory_unsupported": "abc_route_type is not supported"},
        {"extension_mandatory_unsupported": "abc_transfer_method is not supported"},
    ]
    assert ledger.link(1)["available"] == 64


BAD_KEY_REQUESTS = [
    ("number zero", "POST", {"number": 0}, None),
    ("number negative", "POST", {"number": -3}, None),
    ("number huge", "POST", {"number": 10**30}, None),
    ("number over max_key_per_request", "POST", {"number": 129}, None),
    ("number a string", "POST", {"number": "2"}, "number: not an integer"),
    ("number a float", "POST", {"number": 1.5}, "number: not an integer"),
    ("number a boolean", "POST", {"number": True}, "number: not an integer"),
    ("size not a multiple of 8", "POST", {"size": 100}, SIZE_NOT_MULTIPLE_OF_8),
    ("size not a multiple of 8 and too big", "POST", {"size": 10**9 + 1}, SIZE_NOT_MULTIPLE_OF_8),
    ("size zero", "POST", {"size": 0}, None),
    ("size negative", "POST", {"size": -256}, None),
    ("size too small", "POST", {"size": 56}, None),
    ("size too big", "POST", {"size": 8200}, None),
    ("unknown field", "POST", {"numbr": 1}, "numbr: unknown field"),
    ("request not an object", "POST", [1, 2], None),
    ("extension_mandatory not a list", "POST", {"extension_mandatory": {"a": 1}}, None),
    ("extension_optional item not an object", "POST", {"extension_optional": ["a"]}, None),
    ("multicast beyond max_SAE_ID_count", "POST", {"additional_slave_SAE_IDs": ["1", "2", "3", "4", "5"]}, None),
    ("master among additional slaves", "POST", {"additional_slave_SAE_IDs": ["1"]}, None),
    ("primary slave named again", "POST", {"additional_slave_SAE_IDs": [2]}, None),
    ("unknown additional slave", "POST", {"additional_slave_SAE_IDs": ["77"]}, None),
    ("bad additional slave ID", "POST", {"additional_slave_SAE_IDs": [{"id": 2}]}, None),
    ("GET number not a number", "GET", "number=abc", "number: not an integer"),
    ("GET number twice", "GET", "number=1&number=2", "number: given more than once"),
    ("GET unknown parameter", "GET", "count=2", None),
    ("GET size not a multiple of 8", "GET", "size=12", SIZE_NOT_MULTIPLE_OF_8),
    ("GET number with two minus signs", "GET", "number=--1", "number: not an integer"),
    ("GET size with two minus signs", "GET", "size=--1", "size: not an integer"),
    ("GET number with a plus sign", "GET", "number=+1", "number: not an integer"),
]


@pytest.mark.parametrize("case, method, payload, message", BAD_KEY_REQUESTS, ids=[c[0] for c in BAD_KEY_REQUESTS])
def test_bad_key_request_is_400_and_takes_nothing(sae1, ledger, case, method, payload, message):
    if method == "GET":
        response = sae1.get(f"/api/v1/keys/2/enc_keys?{payload}")
    else:
        response = sae1.post("/api/v1/keys/2/enc_keys", json=payload)
    assert_error(response, 400, message)
    assert ledger.assert_exact(1)["available"] == 64
    assert ledger.waiting() == 0


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b'{"number": 1', b"nan"])
def test_malformed_json_is_400(sae1, ledger, body):
    response = sae1.post("/api/v1/keys/2/enc_keys", data=body, content_type="application/json")
    assert_error(response, 400)
    assert ledger.link(1)["available"] == 64


def test_empty_post_body_is_an_empty_key_request(sae1):
    response = sae1.post("/api/v1/keys/2/enc_keys", data=b"", content_type="application/json")
    assert response.status_code == 200 and len(response.get_json()["keys"]) == 1


def test_not_enough_keys_is_503_and_takes_nothing(sae1, ledger):
    response = sae1.post("/api/v1/keys/2/enc_keys", json={"number": 9, "size": 2048})
    assert_error(response, 503)
    assert ledger.assert_exact(1)["available"] == 64


def test_oversized_body_is_413_json(sae1):
    response = sae1.post("/api/v1/keys/2/enc_keys", data=b"{" + b" " * 70_000 + b"}",
                         content_type="application/json")
    assert_error(response, 413)


def test_unknown_route_is_404_json(sae1):
    assert_error(sae1.get("/api/v1/keys/2/nothing"), 404)


@pytest.mark.parametrize("method, url", [
    ("DELETE", "/api/v1/keys/2/enc_keys"), ("PUT", "/api/v1/keys/1/dec_keys"), ("POST", "/api/v1/keys/2/status"),
    ("POST", "/api/v1/sae/info/me"),
])
def test_wrong_method_is_405_json(sae1, method, url):
    assert_error(sae1.open(url, method=method), 405)


@pytest.mark.parametrize("slave", ["99", "abc", "1", "-2", "%C2%B2"])
def test_unknown_or_same_slave_is_400(sae1, slave):
    assert_error(sae1.get(f"/api/v1/keys/{slave}/status"), 400)
    assert_error(sae1.get(f"/api/v1/keys/{slave}/enc_keys"), 400)


@pytest.mark.parametrize("environ", [
    {}, {"SSL_CLIENT_VERIFY": "NONE"}, {"SSL_CLIENT_VERIFY": "FAILED", "SSL_CLIENT_M_SERIAL": "1"},
    {"SSL_CLIENT_VERIFY": "SUCCESS", "SSL_CLIENT_M_SERIAL": "zz"},
])
def test_no_verified_certificate_is_401(app, environ):
    client = client_with(app, environ)
    for url in ("/api/v1/keys/2/status", "/api/v1/keys/2/enc_keys", "/api/v1/sae/info/me",
                "/api/v1/keys/entropy/total"):
        assert_error(client.get(url), 401)


def test_unregistered_serial_is_401(app, pki, ledger):
    client = client_with(app, sae_environ(pki, "sae9"))
    assert_error(client.get("/api/v1/keys/2/enc_keys"), 401)
    assert ledger.link(1)["available"] == 64


def test_serial_compared_as_number(app, pki):
    environ = sae_environ(pki, "sae1")
    environ["SSL_CLIENT_M_SERIAL"] = "00" + environ["SSL_CLIENT_M_SERIAL"].lower()
    assert client_with(app, environ).get("/api/v1/sae/info/me").get_json() == {"SAE_ID": 1}


def test_info_me(sae1, sae2):
    assert sae1.get("/api/v1/sae/info/me").get_json() == {"SAE_ID": 1}
    assert sae2.get("/api/v1/sae/info/me").get_json() == {"SAE_ID": 2}


def test_dec_keys_by_an_sae_that_is_not_the_slave_is_401_and_keeps_the_key(app, pki, sae1, sae2):
    key = sae1.get("/api/v1/keys/2/enc_keys").get_json()["keys"][0]
    # SAE 1 is the master, not the slave, of its own key.
    assert_error(sae1.get(f"/api/v1/keys/1/dec_keys?key_ID={key['key_ID']}"), 401)
    assert sae2.get(f"/api/v1/keys/1/dec_keys?key_ID={key['key_ID']}").get_json()["keys"] == [key]


def test_dec_keys_items_may_name_the_urls_master_as_a_client_library_does(sae1, sae2):
    # The C library under the strongSwan and OpenSSL QKD plugins puts master_SAE_ID in every item.
    keys = sae1.post("/api/v1/keys/2/enc_keys", json={"number": 2}).get_json()["keys"]
    body = {"key_IDs": [{"key_ID": keys[0]["key_ID"], "master_SAE_ID": "1"},
                        {"key_ID": keys[1]["key_ID"], "master_SAE_ID": 1}]}
    assert sae2.post("/api/v1/keys/1/dec_keys", json=body).get_json()["keys"] == keys


def test_dec_keys_items_naming_another_master_are_400_and_keep_the_keys(sae1, sae2, ledger):
    key = sae1.get("/api/v1/keys/2/enc_keys").get_json()["keys"][0]
    body = {"key_IDs": [{"key_ID": key["key_ID"], "master_SAE_ID": "9"}]}
    assert_error(sae2.post("/api/v1/keys/1/dec_keys", json=body), 400,
                 "key_IDs: master_SAE_ID 9 is not the master SAE of the URL (1)")
    assert_error(sae2.post("/api/v1/keys/1/dec_keys", json={"key_IDs": [{"key_ID": key["key_ID"],
                                                                         "master_SAE_ID": "one"}]}), 400)
    assert ledger.waiting() == 1
    assert sae2.get(f"/api/v1/keys/1/dec_keys?key_ID={key['key_ID']}").get_json()["keys"] == [key]


def test_status_counts_stop_at_the_largest_signed_32_bit_integer(tmp_path, pki):
    # That C library refuses a larger count; max_key_count may be configured up to 2^63 - 1.
    app = create_app(load_config(write_config(tmp_path / "big", pki, limits={"max_key_count": 2**40})))
    body = client_with(app, sae_environ(pki, "sae1")).get("/api/v1/keys/2/status").get_json()
    assert body["max_key_count"] == 2**31 - 1


def test_second_fetch_is_400_with_the_standard_message(sae1, sae2):
    key = sae1.get("/api/v1/keys/2/enc_keys").get_json()["keys"][0]
    assert sae2.get(f"/api/v1/keys/1/dec_keys?key_ID={key['key_ID']}").status_code == 200
    assert_error(sae2.get(f"/api/v1/keys/1/dec_keys?key_ID={key['key_ID']}"), 400, KEYS_NOT_FOUND)


def test_one_missing_key_id_fails_the_whole_request_and_erases_nothing(sae1, sae2, ledger):
    key = sae1.get("/api/v1/keys/2/enc_keys").get_json()["keys"][0]
    body = {"key_IDs": [{"key_ID": key["key_ID"]}, {"key_ID": str(uuid.uuid4())}]}
    assert_error(sae2.post("/api/v1/keys/1/dec_keys", json=body), 400, KEYS_NOT_FOUND)
    assert ledger.waiting() == 1
    assert sae2.post("/api/v1/keys/1/dec_keys", json={"key_IDs": [{"key_ID": key["key_ID"]}]}).status_code == 200


def test_key_id_with_the_wrong_master_is_not_found(sae1, sae2, ledger):
    key = sae1.get("/api/v1/keys/2/enc_keys").get_json()["keys"][0]
    # The slave names itself as master: no such key for that pair.
    assert_error(sae2.get(f"/api/v1/keys/2/dec_keys?key_ID={key['key_ID']}"), 400)
    assert ledger.waiting() == 1


def test_key_ids_are_accepted_in_upper_case(sae1, sae2):
    key = sae1.get("/api/v1/keys/2/enc_keys").get_json()["keys"][0]
    response = sae2.get(f"/api/v1/keys/1/dec_keys?key_ID={key['key_ID'].upper()}")
    assert response.get_json()["keys"] == [key]


BAD_KEY_ID_REQUESTS = [
    ("no key_IDs", "POST", {}),
    ("empty key_IDs", "POST", {"key_IDs": []}),
    ("key_IDs not a list", "POST", {"key_IDs": "abc"}),
    ("key_ID not a UUID", "POST", {"key_IDs": [{"key_ID": "not-a-uuid"}]}),
    ("key_ID a number", "POST", {"key_IDs": [{"key_ID": 5}]}),
    ("key_ID UUID without dashes", "POST", {"key_IDs": [{"key_ID": uuid.uuid4().hex}]}),
    ("same key_ID twice", "POST", {"key_IDs": [{"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139"}] * 2}),
    ("unknown field", "POST", {"key_IDs": [{"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139", "x": 1}]}),
    ("too many key IDs", "POST", {"key_IDs": [{"key_ID": str(uuid.uuid4())} for _ in range(129)]}),
    ("GET without key_ID", "GET", ""),
    ("GET key_ID not a UUID", "GET", "key_ID=12"),
    ("GET two key_IDs", "GET", f"key_ID={uuid.uuid4()}&key_ID={uuid.uuid4()}"),
    ("GET other parameter", "GET", f"key_ID={uuid.uuid4()}&number=1"),
]


@pytest.mark.parametrize("case, method, payload", BAD_KEY_ID_REQUESTS, ids=[c[0] for c in BAD_KEY_ID_REQUESTS])
def test_bad_key_ids_request_is_400_and_erases_nothing(sae1, sae2, ledger, case, method, payload):
    sae1.get("/api/v1/keys/2/enc_keys")
    if method == "GET":
        response = sae2.get(f"/api/v1/keys/1/dec_keys?{payload}")
    else:
        response = sae2.post("/api/v1/keys/1/dec_keys", data=json.dumps(payload), content_type="application/json")
    assert_error(response, 400)
    assert ledger.waiting() == 1


def test_dec_keys_with_empty_body_is_400(sae2):
    assert_error(sae2.post("/api/v1/keys/1/dec_keys", data=b""), 400)


def test_entropy_of_random_keys_is_close_to_8(sae1):
    value = sae1.get("/api/v1/keys/entropy/total").get_json()["total_entropy"]
    assert 7.5 < value <= 8.0


DEEP_JSON = b"[" * 30_000 + b"]" * 30_000


@pytest.mark.parametrize("url", ["/api/v1/keys/2/enc_keys", "/api/v1/keys/1/dec_keys"])
def test_json_nested_beyond_the_recursion_limit_is_400(sae1, sae2, ledger, url):
    client = sae1 if "enc_keys" in url else sae2
    response = client.post(url, data=DEEP_JSON, content_type="application/json")
    assert_error(response, 400, "the request body is not valid JSON")
    assert ledger.assert_exact(1)["available"] == 64


@pytest.mark.parametrize("url", ["//api//v1//keys//2//status", "/api/v1//keys/2/status", "/api/v1/keys/2/status/"])
def test_doubled_or_trailing_slashes_are_a_json_404_not_a_redirect(sae1, url):
    assert_error(sae1.get(url), 404)


@pytest.mark.parametrize("given, kept", [("trace-42.a_b", True), ("caf\u00e9", False), ("a b", False),
                                         ("x" * 65, False), ("\u00b2\u00b3", False)])
def test_request_ids_are_short_ascii_tokens(sae1, given, kept):
    response = sae1.get("/api/v1/sae/info/me", headers={"X-Request-ID": given})
    returned = response.headers["X-Request-ID"]
    assert (returned == given) is kept
    assert returned.isascii()


def test_a_database_of_an_older_kme_is_named_not_used(app, config_path, pki):
    Ledger(config_path.parent / "kme.db").write(("ALTER TABLE links DROP COLUMN set_aside",))
    newer = create_app(load_config(config_path))
    response = client_with(newer, sae_environ(pki, "sae1")).get("/api/v1/keys/2/status")
    assert response.status_code == 503
    assert response.json["message"] == (
        "key data access error: the database was created by an older version of the KME (table links has no "
        "column set_aside); see docs/deployment.md, Upgrading")


def test_the_key_container_built_directly_is_what_the_schema_dumps():
    keys = [DeliveredKeyMaterial(str(uuid.uuid4()), bytes(range(32))), DeliveredKeyMaterial(str(uuid.uuid4()), b"\xff")]
    assert key_container(keys) == KeyContainerSchema().dump({"keys": keys})


def test_the_status_built_directly_is_what_the_schema_dumps(app):
    from kme.config import Sae
    from kme.domain import delivery

    with app.app_context():
        status = delivery.get_status(app.extensions["kme"], Sae(id=1, kme_id=1, certificate_serial=None), "2")
    body = status_body(status)
    assert body == StatusSchema().dump(status)
    assert list(body) == list(StatusSchema().dump(status))


def test_the_entropy_answered_is_what_the_schema_dumps(sae1):
    body = sae1.get("/api/v1/keys/entropy/total").json
    assert body == EntropySchema().dump(body) and isinstance(body["total_entropy"], float)
