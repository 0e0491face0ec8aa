"""The database URIs a configuration may give, per engine, in the one form the KME uses: a leaf the
configuration and the storage backends share (no database driver is loaded here)."""
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from kme.errors import ConfigError

ENGINES = ("sqlite", "postgresql")
IN_MEMORY_URI = "sqlite:///:memory:"
POSTGRESQL_DRIVER = "postgresql+psycopg"


def scheme_of(uri: str) -> str:
    """The engine a URI names: "sqlite", "postgresql", or what stands before its "://" or "+"."""
    return uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else "sqlite"


def normalized(value: str, base_dir: Path) -> str:
    """The URI a configured ``db_uri`` stands for (paths relative to ``base_dir``); ConfigError if it is wrong."""
    scheme = scheme_of(value)
    if scheme not in ENGINES:
        raise ConfigError(f"this_kme.db_uri: the KME runs on {' or '.join(ENGINES)}, not {scheme}")
    return _sqlite_uri(value, base_dir) if scheme == "sqlite" else _postgresql_uri(value, base_dir)


def sqlite_path_uri(path: str, base_dir: Path) -> str:
    """The URI of a ``sqlite_db_path``: a file (relative to ``base_dir``) or ``:memory:``."""
    if path == ":memory:":
        return IN_MEMORY_URI
    return "sqlite:///" + str((base_dir / path).resolve())


def sqlite_path(uri: str) -> str | None:
    """The database file a ``sqlite:///path`` URI names (None in memory)."""
    database = uri.removeprefix("sqlite:///")
    return None if not database or database == ":memory:" else database


def describe(uri: str) -> str:
    """The database as logs and pages name it: a SQLite file's path, or a URI without its password."""
    if scheme_of(uri) == "sqlite":
        return sqlite_path(uri) or ":memory:"
    return make_url(uri).render_as_string(hide_password=True)


def _sqlite_uri(value: str, base_dir: Path) -> str:
    """``sqlite:///path`` (relative to ``base_dir``) or ``:memory:``."""
    if value != ":memory:" and not value.startswith("sqlite:///"):
        raise ConfigError("this_kme.db_uri: SQLite is named sqlite:///path or :memory:")
    return sqlite_path_uri(value.removeprefix("sqlite:///"), base_dir)


def _postgresql_uri(value: str, base_dir: Path) -> str:
    """``postgresql+psycopg://user[:password]@host[:port]/database[?...]``; a relative ``passfile`` is taken from
    ``base_dir``."""
    try:
        url = make_url(value)
    except ArgumentError:
        raise ConfigError("this_kme.db_uri: not a database URI") from None
    if url.drivername not in ("postgresql", POSTGRESQL_DRIVER):
        raise ConfigError(f"this_kme.db_uri: PostgreSQL is reached through psycopg 3: {POSTGRESQL_DRIVER}://...")
    if not url.database:
        raise ConfigError("this_kme.db_uri: names no database (postgresql+psycopg://user@host/database)")
    query = dict(url.query)
    if "passfile" in query:
        query["passfile"] = str((base_dir / query["passfile"]).resolve())
    return url.set(drivername=POSTGRESQL_DRIVER, query=query).render_as_string(hide_password=False)
