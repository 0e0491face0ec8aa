"""The versions of the database schema (Alembic, through Flask-Migrate's `flask db`), and how a process finds
whether a database is at the version it needs.

A new database gets the models' tables and the newest version at once
(kme.storage.schema.ensure_schema); an existing one is upgraded only by
`flask db upgrade`, never by a KME starting, so that the hosts of a KME
upgrade once, together, at a time the operator chooses (docs/deployment.md).
"""
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

DIRECTORY = Path(__file__).resolve().parent
# The schema of the releases before migrations existed: a database without a version is at this one.
BASELINE = "0001"
_VERSION_TABLE = "alembic_version"
# A table every version has: the sign that a database without a version table has the KME's schema.
_ANY_TABLE = "links"


def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(DIRECTORY))


def head() -> str:
    """The newest version, the one this KME needs."""
    return _scripts().get_current_head()


def version(connection) -> str | None:
    """The version of the database: None when it has no KME schema yet, BASELINE when it predates versions."""
    tables = set(inspect(connection).get_table_names())
    if _VERSION_TABLE in tables:
        return MigrationContext.configure(connection).get_current_revision()
    return BASELINE if _ANY_TABLE in tables else None


def stamp_head(connection) -> None:
    """Record that the database (its tables just made from the models) is at the newest version."""
    MigrationContext.configure(connection).stamp(_scripts(), "head")


def adopt_unversioned(connection) -> bool:
    """Record BASELINE in a database made before versions existed, so that `flask db upgrade` goes on from it;
    whether it was such a database."""
    tables = set(inspect(connection).get_table_names())
    if _VERSION_TABLE in tables or _ANY_TABLE not in tables:
        return False
    MigrationContext.configure(connection).stamp(_scripts(), BASELINE)
    return True


def problem(found: str | None) -> str | None:
    """Why a database at version ``found`` cannot be used by this KME, or None."""
    needed = head()
    if found == needed:
        return None
    known = {script.revision for script in _scripts().walk_revisions()}
    if found in known:
        return (f"the database schema is at version {found}, this KME needs {needed}: run `flask db upgrade` "
                "(docs/deployment.md, Upgrading)")
    return (f"the database schema is at version {found}, which this KME does not know (written by a newer KME?); "
            f"it needs {needed}")
