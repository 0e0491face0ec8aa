"""Shared fixtures: a PKI generated for the session, the session's PostgreSQL cluster (KME_TEST_ENGINE=postgresql),
configured apps, SAE environs."""
import pytest

from kme import create_app
from kme.config import load_config
from kme.operations.certs import generate_pki
from tests import launcher, support
from tests.support import PASSWORD, Pki, free_port, write_config, write_keys

# KME 1 has SAEs 1 and 2 registered, and SAE 9 whose certificate is valid
# but never registered; KME 2 has SAEs 3 and 4, KME 3 has SAE 5.
# SAEs 9 and 10 have certificates of KME 1's SAE CA but are in no configuration unless a test or bench adds them.
PKI_LAYOUT = {1: [1, 2, 9, 10], 2: [3, 4], 3: [5], 4: [6]}


@pytest.fixture(scope="session", autouse=True)
def database_engine():
    """On PostgreSQL, a throwaway cluster for the session; every configuration a test writes gets a database."""
    if support.ENGINE != "postgresql":
        yield support.ENGINE
        return
    from tests.postgres import Cluster

    cluster = Cluster(free_port(), durable=False)
    cluster.start()
    support.cluster = cluster
    try:
        yield support.ENGINE
    finally:
        support.cluster = None
        cluster.stop()


@pytest.fixture(autouse=True)
def _close_connections():
    """On PostgreSQL, close the connections of the apps a test made in this process (each holds server
    connections until it is collected)."""
    yield
    if support.ENGINE == "postgresql":
        support.close_engines()


def pytest_sessionfinish(session):
    launcher.close()


def pytest_runtest_setup(item):
    if support.ENGINE == "sqlite":
        if item.get_closest_marker("postgresql_only"):
            pytest.skip("PostgreSQL's own behaviour: run in the PostgreSQL pass")
        return
    if item.get_closest_marker("sqlite_only"):
        pytest.skip(f"SQLite's own mechanism; the suite runs on {support.ENGINE} now")
    if item.get_closest_marker("engine_independent"):
        pytest.skip("uses no database: run once, with SQLite")
    if item.get_closest_marker("one_engine"):
        pytest.skip("above the storage layer, whose statements other tests run here: run once, with SQLite")


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
        from kme.storage.schema import ensure_schema

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
