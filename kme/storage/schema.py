"""The schema of a new database (at the newest version), its identity, data key and link rows: made once per
process, exclusively among the processes starting together."""
import uuid

from flask import current_app
from sqlalchemy import insert, inspect, select

from kme.errors import StorageFailure
from kme.storage import at_rest, migrations
from kme.storage.db import db, remember_meta, storage
from kme.storage.keystore import intake
from kme.storage.meta_names import DATABASE_ID
from kme.storage.models import Meta


def ensure_schema() -> bool:
    """Create the schema of a new database (at the newest version), the database's identity and data key, and link
    rows, once per process, and open the data key; True the first time.

    Runs exclusively (the backend's schema_connection), so processes starting together do not race.
    StorageFailure if the database is at another version of the schema (`flask db upgrade` upgrades it), or if
    the process's KEK does not open the data key.
    """
    held = storage()
    if held.schema_ready:
        return False
    with held.backend.schema_connection() as connection:
        with connection.begin():
            found = migrations.version(connection)
            if found is None:
                db.metadata.create_all(connection)
                migrations.stamp_head(connection)
            elif problem := migrations.problem(found):
                raise StorageFailure(problem)
            _check_columns(connection)
            known = set(connection.scalars(select(Meta.name)))
            if DATABASE_ID not in known:
                connection.execute(insert(Meta).values(name=DATABASE_ID, value=uuid.uuid4().hex.encode()))
            facts = dict(connection.execute(select(Meta.name, Meta.value)).all())
            at_rest.establish(connection, current_app.extensions["kme_kek"], facts)
            remember_meta(connection)
    config = current_app.extensions["kme"]
    # A foreign KMS has a link row too: it counts the keys it passed us (and holds their histogram).
    intake.ensure_links([*config.key_directories(), *(foreign.id for foreign in config.foreign_kms)])
    held.schema_ready = True
    return True


def _check_columns(connection) -> None:
    """StorageFailure if a table lacks a column of the models: the database was made by an older KME.

    create_all() adds missing tables, never missing columns; without this a
    request would fail later on an SQL error naming the column.
    """
    inspector = inspect(connection)
    for table in db.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing = [column.name for column in table.columns if column.name not in present]
        if missing:
            raise StorageFailure(f"the database was created by an older version of the KME (table {table.name} has "
                                 f"no column {missing[0]}); see docs/deployment.md, Upgrading")
