"""Shared fixtures: a PKI generated for the session, configured apps, SAE environs."""
import pytest

from kme import create_app
from kme.config import load_config
from kme.operations.certs import generate_pki
from tests.support import PASSWORD, Pki, write_config, write_keys

# KME 1 has SAEs 1 and 2 registered, and SAE 9 whose certificate is valid
# but never registered; KME 2 has SAEs 3 and 4, KME 3 has SAE 5.
PKI_LAYOUT = {1: [1, 2, 9], 2: [3, 4], 3: [5]}


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    return Pki(folder, generate_pki(folder, PKI_LAYOUT, PASSWORD))


def sae_environ(pki: Pki, sae: str) -> dict:
    """The environ keys a server sets for a verified client certificate of ``sae``."""
    serial = int.from_bytes(bytes(pki.serials[sae]), "big")
    return {"SSL_CLIENT_VERIFY": "SUCCESS", "SSL_CLIENT_M_SERIAL": format(serial, "X")}


@pytest.fixture
def config_path(tmp_path, pki):
    path = write_config(tmp_path / "kme1", pki)
    write_keys(path.parent / "keys" / "a.cor", 64)
    return path


@pytest.fixture
def app(config_path):
    app = create_app(load_config(config_path))
    app.config["TESTING"] = True
    with app.app_context():
        from kme.operations.ingest import ingest_directories
        from kme.storage.db import ensure_schema

        ensure_schema()
        ingest_directories(app.extensions["kme"])
    yield app


def client_with(app, environ: dict):
    """A test client whose requests carry ``environ`` (as the gunicorn worker would set it)."""
    client = app.test_client()
    client.environ_base.update(environ)
    return client


@pytest.fixture
def sae1(app, pki):
    return client_with(app, sae_environ(pki, "sae1"))


@pytest.fixture
def sae2(app, pki):
    return client_with(app, sae_environ(pki, "sae2"))


@pytest.fixture
def runner(app):
    return app.test_cli_runner()
