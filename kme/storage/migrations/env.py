"""Alembic's environment for `flask db`: the KME's models on the app's own engine, in one transaction that is
exclusive among the KME's writers (the backend's schema_connection), on any host."""
import logging

from alembic import context
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import current_app
from sqlalchemy import inspect

from kme.storage import migrations
from kme.storage.db import storage

log = logging.getLogger("kme.migrations")


def _applied(step, **_) -> None:
    action = "upgraded to" if step.is_upgrade else "downgraded from"
    log.info("schema %s version %s: %s", action, step.up_revision_id, step.up_revision.doc.splitlines()[0])


def _adopt_unversioned(connection) -> bool:
    """Record BASELINE in a database made before versions existed, so that the upgrade goes on from it; whether
    it was such a database."""
    tables = set(inspect(connection).get_table_names())
    if migrations.VERSIONS.name in tables or migrations.ANY_TABLE not in tables:
        return False
    MigrationContext.configure(connection).stamp(ScriptDirectory(str(migrations.DIRECTORY)), migrations.BASELINE)
    return True


def _run() -> None:
    if context.is_offline_mode():
        raise SystemExit("kme: migrations run against the database itself: flask db upgrade (without --sql)")
    database = current_app.extensions["migrate"].db
    engine = database.engine
    with storage().backend.schema_connection() as connection:
        # SQLite alters a table by copying it (batch mode); PostgreSQL alters it in place.
        context.configure(connection=connection, target_metadata=database.metadata,
                          render_as_batch=engine.dialect.name == "sqlite", compare_type=True,
                          on_version_apply=_applied)
        with context.begin_transaction():
            if _adopt_unversioned(connection):
                log.info("the database predates schema versions: recorded as version %s", migrations.BASELINE)
            context.run_migrations()


_run()
