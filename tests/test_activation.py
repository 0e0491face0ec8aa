"""Settling pending activations, in process (the peer here is never reachable)."""
import json

import pytest

from kme import create_app
from kme.config import load_config
from kme.domain import activation
from kme.operations.ingest import ingest_directories
from kme.storage.keystore import outgoing
from kme.storage.schema import ensure_schema
from tests.support import Ledger, confirm_link, free_port, write_config, write_keys


@pytest.fixture
def kme(tmp_path, pki):
    peer = {
        "id": 2, "key_directory_to_watch": "keys-2", "inter_kme_bind_address": f"127.0.0.1:{free_port()}",
        "https_client_authentication_certificate": str(pki.folder / "kme1" / "kme1-to-kme2.pfx"),
        "https_client_authentication_certificate_password": "password", "server_ca_cert_path": pki.server_ca,
        "connect_timeout_seconds": 0.5, "read_timeout_seconds": 0.5,
    }
    config_path = write_config(tmp_path, pki, remote_saes=[(3, 2)], other_kmes=[peer])
    (tmp_path / "keys-2").mkdir()
    write_keys(tmp_path / "keys-2" / "link.cor", 10)
    app = create_app(load_config(config_path))
    with app.app_context():
        ensure_schema()
        ingest_directories(app.extensions["kme"])
        confirm_link(1, 2)
        reservation = outgoing.reserve(2, 1, [3], [], 2, 256)
        outgoing.mark_unknown(reservation.activation_id, "has an unknown outcome")
    return app, config_path, Ledger(tmp_path / "kme.db")


def test_unreachable_peer_keeps_the_keys_held_back(kme):
    app, _, ledger = kme
    with app.app_context():
        assert activation.settle_pending(app.extensions["kme"]) == 0
    assert ledger.assert_exact(2)["reserved"] == 2


def test_keys_of_a_link_that_left_the_configuration_are_discarded(kme):
    _, config_path, ledger = kme
    raw = json.loads(config_path.read_text())
    raw["other_kmes"], raw["saes"] = [], [sae for sae in raw["saes"] if sae["kme_id"] == 1]
    config_path.write_text(json.dumps(raw))
    app = create_app(load_config(config_path))
    with app.app_context():
        activation.settle_pending(app.extensions["kme"])
    counts = ledger.assert_exact(2)
    assert (counts["reserved"], counts["discarded"]) == (0, 2)
