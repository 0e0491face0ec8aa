"""Schema versions: `flask db upgrade` makes or upgrades a database (on the session's engine), and a KME refuses a
database at another version with one line."""
import os
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from kme.config import load_config
from kme.storage import migrations
from kme.storage.db import db
from tests.support import (
    ROOT,
    Ledger,
    run_cli,
    sae_port,
    sae_session,
    start_sae_interface,
    write_config,
    write_keys,
)


@pytest.fixture
def kme(tmp_path, pki):
    config = write_config(tmp_path / "kme", pki)
    write_keys(config.parent / "keys" / "a.cor", 20)
    return config


def engine_of(config):
    return create_engine(load_config(config).this_kme.database_uri)


def schema_differences(config) -> list:
    """What the database's tables lack or hold beyond the models (types included)."""
    from kme.storage import models  # noqa: F401 - db.metadata holds the tables once the models are imported

    engine = engine_of(config)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), db.metadata)
    finally:
        engine.dispose()


def version_of(config) -> str | None:
    engine = engine_of(config)
    try:
        with engine.connect() as connection:
            return migrations.version(connection)
    finally:
        engine.dispose()


def upgrade(config, *args: str):
    result = run_cli(["db", "upgrade", *args], config)
    assert result.returncode == 0, result.stderr
    return result


def test_upgrade_from_the_first_version_to_the_newest_gives_the_models_schema(kme):
    first = upgrade(kme, migrations.BASELINE)
    assert "upgraded to version 0001" in first.stderr
    assert version_of(kme) == migrations.BASELINE
    assert schema_differences(kme) != []
    upgrade(kme)
    assert version_of(kme) == migrations.head() != migrations.BASELINE
    assert schema_differences(kme) == []


def test_a_new_database_made_by_the_kme_is_at_the_newest_version(kme):
    assert run_cli(["ingest-keys"], kme).returncode == 0
    assert version_of(kme) == migrations.head()
    assert schema_differences(kme) == []
    result = upgrade(kme)
    assert "upgraded" not in result.stderr


def sae_answer(config, pki, tmp_path, path: str):
    process = start_sae_interface(config, tmp_path / "sae.log")
    try:
        return sae_session(pki, 1, 1).get(f"https://127.0.0.1:{sae_port(config)}/api/v1{path}", timeout=10)
    finally:
        process.stop()


def test_a_database_of_the_release_before_versions_is_refused_then_upgraded_in_place(kme, pki, tmp_path):
    assert run_cli(["ingest-keys"], kme).returncode == 0
    ledger = Ledger(kme.parent / "kme.db")
    keys = ledger.pool_keys()
    # What the release before schema versions left: the first version's tables, no version table.
    result = run_cli(["db", "downgrade", migrations.BASELINE], kme)
    assert result.returncode == 0, result.stderr
    ledger.write(("DROP TABLE alembic_version",))
    assert version_of(kme) == migrations.BASELINE
    # Sealed at that release's places, which this release's do not open: compared as stored.
    stored = ledger._query("SELECT id, material FROM pool_keys ORDER BY id")

    refused = sae_answer(kme, pki, tmp_path, "/keys/2/status")
    assert refused.status_code == 503
    assert refused.json()["message"] == (
        f"key data access error: the database schema is at version {migrations.BASELINE}, this KME needs "
        f"{migrations.head()}: run `flask db upgrade` (docs/deployment.md, Upgrading)")
    line = run_cli(["kme-status"], kme)
    assert line.returncode == 1 and line.stderr.strip().endswith("run `flask db upgrade` (docs/deployment.md, Upgrading)")
    assert ledger._query("SELECT id, material FROM pool_keys ORDER BY id") == stored

    result = upgrade(kme)
    assert "predates schema versions: recorded as version 0001" in result.stderr
    assert version_of(kme) == migrations.head() and schema_differences(kme) == []
    assert ledger.pool_keys() == keys
    status = sae_answer(kme, pki, tmp_path, "/keys/2/status")
    assert status.status_code == 200 and status.json()["stored_key_count"] == 20


def test_a_version_this_kme_does_not_know_is_refused(kme):
    assert run_cli(["ingest-keys"], kme).returncode == 0
    Ledger(kme.parent / "kme.db").write(("UPDATE alembic_version SET version_num = '9999'",))
    result = run_cli(["ingest-keys"], kme)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Error: the database schema is at version 9999, which this KME does not know (written by a newer KME?); "
        f"it needs {migrations.head()}")


def test_migrations_run_against_the_database_only(kme):
    result = run_cli(["db", "upgrade", "--sql"], kme)
    assert result.returncode != 0
    assert "migrations run against the database itself: flask db upgrade (without --sql)" in result.stderr
    assert version_of(kme) is None


def test_the_events_table_takes_a_line_longer_than_the_first_version_allowed(kme):
    upgrade(kme)
    engine = engine_of(kme)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO events (created_at, message) VALUES ('now', :message)"),
                               {"message": "x" * 2000})
    finally:
        engine.dispose()
    assert Ledger(kme.parent / "kme.db")._query("SELECT length(message) FROM events") == [(2000,)]


def _insert(connection, table: str, **values) -> None:
    """A row of ``table`` with ``values`` and a zero of its type in every other column that must have one."""
    zeros = {str: "", bool: False, bytes: b""}
    for column in inspect(connection).get_columns(table):
        if column["name"] not in values and not column["nullable"] and column.get("autoincrement") is not True:
            values[column["name"]] = zeros.get(column["type"].python_type, 0)
    names = ", ".join(values)
    connection.execute(text(f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + n for n in values)})"), values)


def test_version_4_keeps_the_grace_of_files_the_peer_holds_and_learns_every_peers_progress_again(kme):
    """A file the peer holds keys of was reported; of the others nobody can tell: each is reported again once the
    peer's progress is learnt from the start."""
    upgrade(kme, "0003")
    engine = engine_of(kme)
    try:
        with engine.begin() as connection:
            _insert(connection, "links", peer_kme_id=2, progress_seen=40, progress_sent=30)
            _insert(connection, "key_files", id=1, link_id=2, name="held.cor", peer_position=5, changed_at=100.0)
            _insert(connection, "key_files", id=2, link_id=2, name="unknown.cor", peer_position=0, changed_at=100.0)
        upgrade(kme)
        with engine.connect() as connection:
            files = connection.execute(text("SELECT name, peer_reported_at FROM key_files ORDER BY id")).all()
            cursors = connection.execute(text("SELECT progress_seen, progress_sent FROM links")).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in files] == [("held.cor", 100.0), ("unknown.cor", None)]
    assert [tuple(row) for row in cursors] == [(0, 30)]


def test_version_5_seals_every_key_again_at_its_new_place_and_back(kme, pki, tmp_path):
    """Pool keys bound to their file's name, a waiting key to its slaves: the step opens each at the place it had
    and seals it at the new one (with the KEK of the configuration); a downgrade does the reverse."""
    assert run_cli(["ingest-keys"], kme).returncode == 0
    process = start_sae_interface(kme, tmp_path / "sae.log")
    try:
        url = f"https://127.0.0.1:{sae_port(kme)}/api/v1"
        (key,) = sae_session(pki, 1, 1).post(f"{url}/keys/2/enc_keys", json={}, timeout=10).json()["keys"]
        ledger = Ledger(kme.parent / "kme.db")
        keys = ledger.pool_keys()
        stored = ledger._query("SELECT material FROM pool_keys ORDER BY id"), ledger._query(
            "SELECT material FROM delivered_keys")
        upgrade(kme)
        assert run_cli(["db", "downgrade", "0004"], kme).returncode == 0
        resealed = ledger._query("SELECT material FROM pool_keys ORDER BY id"), ledger._query(
            "SELECT material FROM delivered_keys")
        assert all(old != new for old, new in zip(stored[0] + stored[1], resealed[0] + resealed[1]))
        upgrade(kme)
        assert ledger.pool_keys() == keys
        fetched = sae_session(pki, 1, 2).get(f"{url}/keys/1/dec_keys", params={"key_ID": key["key_ID"]}, timeout=10)
        assert fetched.json()["keys"] == [key]
    finally:
        process.stop()


@pytest.mark.engine_independent
def test_the_versions_a_kme_reads_without_alembic_are_alembics():
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(migrations.DIRECTORY))
    assert migrations.revisions() == tuple(reversed([script.revision for script in scripts.walk_revisions()]))
    assert migrations.head() == scripts.get_current_head()


def test_a_kme_process_makes_and_checks_its_schema_without_loading_alembic(kme):
    check = ("import sys\nfrom kme import create_app\nfrom kme.storage.schema import ensure_schema\n"
             "for interface in ('cli', 'sae'):\n"
             "    with create_app(interface=interface).app_context():\n"
             "        ensure_schema()\n"
             "print(sorted({name.split('.')[0] for name in sys.modules} & {'alembic', 'flask_migrate'}))\n")
    env = {**os.environ, "KME_CONFIG": str(kme)}

    made = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    result = run_cli(["db", "current"], kme)

    assert made.returncode == 0 and made.stdout.strip() == "[]", made.stderr
    assert result.returncode == 0 and migrations.head() in result.stdout, result.stderr
