"""Each database engine's module provides the whole backend interface (kme.storage.backends)."""
import pytest

from kme.storage import backends
from kme.storage.backends import postgresql, sqlite

pytestmark = pytest.mark.engine_independent


@pytest.mark.parametrize("backend", [sqlite, postgresql], ids=["sqlite", "postgresql"])
def test_every_backend_provides_the_interface(backend):
    assert [name for name in backends.INTERFACE if not hasattr(backend, name)] == []
    assert [name for name in backends.BACKEND_INTERFACE if not hasattr(backend.Backend, name)] == []
    assert [name for name in backends.SQL_INTERFACE if not hasattr(backend.Connection.sql, name)] == []


@pytest.mark.parametrize("uri, engine", [("sqlite:///kme.db", "sqlite"), ("kme.db", "sqlite"),
                                         ("postgresql+psycopg://kme@db/kme", "postgresql"),
                                         ("postgresql://kme@db/kme", "postgresql")])
def test_a_uri_names_its_backend(uri, engine):
    assert backends.for_uri(uri) is {"sqlite": sqlite, "postgresql": postgresql}[engine]


def test_an_engine_the_kme_does_not_run_on_is_a_key_error():
    with pytest.raises(KeyError):
        backends.for_uri("mysql://db/kme")
