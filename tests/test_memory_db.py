"""An in-memory database: one process that ingests the key files itself."""
import pytest

from kme import create_app
from kme.config import load_config
from tests.conftest import client_with, sae_environ
from tests.support import write_config, write_keys

pytestmark = pytest.mark.sqlite_only


def test_in_memory_kme_ingests_on_first_request_and_serves(tmp_path, pki):
    config = write_config(tmp_path, pki, sqlite_db_path=":memory:")
    write_keys(tmp_path / "keys" / "a.cor", 3)
    app = create_app(load_config(config))
    master, slave = client_with(app, sae_environ(pki, "sae1")), client_with(app, sae_environ(pki, "sae2"))
    assert master.get("/api/v1/keys/2/status").get_json()["stored_key_count"] == 3
    key = master.get("/api/v1/keys/2/enc_keys").get_json()["keys"][0]
    assert slave.get(f"/api/v1/keys/1/dec_keys?key_ID={key['key_ID']}").get_json()["keys"] == [key]
    assert not (tmp_path / ":memory:").exists()
