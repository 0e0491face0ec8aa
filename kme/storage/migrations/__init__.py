"""The versions of the database schema (Alembic, through Flask-Migrate's `flask db`), and how a process finds
whether a database is at the version it needs, without loading Alembic.

A new database gets the models' tables and the newest version at once
(kme.storage.schema.ensure_schema); an existing one is upgraded only by
`flask db upgrade`, never by a KME starting, so that the hosts of a KME
upgrade once, together, at a time the operator chooses (docs/deployment.md).
"""
import functools
import re
from pathlib import Path

from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, inspect, insert, select

DIRECTORY = Path(__file__).resolve().parent
# The schema of the releases before migrations existed: a database without a version is at this one.
BASELINE = "0001"
# A table every version has: the sign that a database without a version table has the KME's schema.
ANY_TABLE = "links"
# Alembic's table of the version, as Alembic makes it, so that `flask db` reads and moves what a KME wrote.
VERSIONS = Table("alembic_version", MetaData(), Column("version_num", String(32), nullable=False),
                 PrimaryKeyConstraint("version_num", name="alembic_version_pkc"))
_FIELD = r"^{}\s*=\s*['\"]?(\w+)['\"]?\s*$"


@functools.cache
def revisions() -> tuple[str, ...]:
    """The versions, oldest first, read from the scripts' ``revision`` and ``down_revision`` lines (Alembic itself
    is loaded only by `flask db`: every KME process checks the version when it starts)."""
    after = {}
    for script in (DIRECTORY / "versions").glob("*.py"):
        text = script.read_text(encoding="utf-8")
        revision = re.search(_FIELD.format("revision"), text, re.M).group(1)
        down = re.search(_FIELD.format("down_revision"), text, re.M).group(1)
        after[None if down == "None" else down] = revision
    chain, current = [], None
    while current in after:
        current = after[current]
        chain.append(current)
    return tuple(chain)


def head() -> str:
    """The newest version, the one this KME needs."""
    return revisions()[-1]


def version(connection) -> str | None:
    """The version of the database: None when it has no KME schema yet, BASELINE when it predates versions."""
    tables = set(inspect(connection).get_table_names())
    if VERSIONS.name in tables:
        return connection.scalar(select(VERSIONS.c.version_num))
    return BASELINE if ANY_TABLE in tables else None


def stamp_head(connection) -> None:
    """Record that the database (its tables just made from the models) is at the newest version."""
    VERSIONS.create(connection)
    connection.execute(insert(VERSIONS).values(version_num=head()))


def problem(found: str | None) -> str | None:
    """Why a database at version ``found`` cannot be used by this KME, or None."""
    needed = head()
    if found == needed:
        return None
    if found in revisions():
        return (f"the database schema is at version {found}, this KME needs {needed}: run `flask db upgrade` "
                "(docs/deployment.md, Upgrading)")
    return (f"the database schema is at version {found}, which this KME does not know (written by a newer KME?); "
            f"it needs {needed}")
