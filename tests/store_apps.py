"""Apps of a KME in process, on a temporary database of the pass's engine, for the key store's tests: a KME
linked to one peer with a file of the link ingested, and what the peer says of it."""
from kme import create_app
from kme.config import load_config
from kme.operations.ingest import ingest_directories
from kme.storage.keystore import progress
from kme.storage.schema import ensure_schema
from tests.support import Ledger, free_port, write_config, write_keys


def kme(tmp_path, pki, kme_id: int, peer_id: int, keys: int = 10):
    """An app of KME ``kme_id`` linked to ``peer_id``, with one ingested file of the link."""
    peer = {
        "id": peer_id, "key_directory_to_watch": "keys-peer", "inter_kme_bind_address": f"127.0.0.1:{free_port()}",
        "https_client_authentication_certificate": str(pki.folder / "kme1" / "kme1-to-kme2.pfx"),
        "https_client_authentication_certificate_password": "password", "server_ca_cert_path": pki.server_ca,
    }
    saes = (1, 2) if kme_id == 1 else (3, 4)
    config_path = write_config(tmp_path, pki, kme_id=kme_id, local_saes=saes, other_kmes=[peer],
                               remote_saes=[(5, peer_id)])
    (tmp_path / "keys-peer").mkdir()
    write_keys(tmp_path / "keys-peer" / "link.cor", keys)
    app = create_app(load_config(config_path))
    with app.app_context():
        ensure_schema()
        ingest_directories(app.extensions["kme"])
    return app, Ledger(tmp_path / "kme.db")


def peer_says(this_kme_id: int, link_id: int, offered: int, database: str = "ab" * 16, seq: int = 1) -> None:
    progress.answered(this_kme_id, link_id, 0,
                      progress.Exchange(database, [progress.FileOffer("link.cor", offered, seq)], 0, 0))
