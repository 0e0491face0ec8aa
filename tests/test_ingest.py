"""Ingestion of key files: odd files, idempotence, resumption, deletion, streaming."""
import os
import tracemalloc
from pathlib import Path

import pytest

from kme import create_app
from kme.config import load_config
from kme.errors import IngestionHalted
from kme.operations import ingest
from kme.operations.ingest import IngestSummary, ingest_directories
from kme.storage.keystore import intake
from kme.storage.schema import ensure_schema
from tests.support import Ledger, run_cli, write_config, write_keys


@pytest.fixture
def setup(tmp_path, pki):
    def make(**extra):
        config_path = write_config(tmp_path / "kme", pki, **extra)
        app = create_app(load_config(config_path))
        with app.app_context():
            ensure_schema()
        return app, config_path.parent / "keys", Ledger(config_path.parent / "kme.db")
    return make


def run(app) -> IngestSummary:
    with app.app_context():
        return ingest_directories(app.extensions["kme"])


def test_ingests_whole_keys_and_warns_about_trailing_bytes(setup):
    app, keys, ledger = setup()
    data = write_keys(keys / "a.cor", 10)
    (keys / "b.cor").write_bytes(os.urandom(32 * 3 + 5))
    summary = run(app)
    assert (summary.files, summary.keys) == (2, 13)
    assert any("5 trailing bytes" in warning for warning in summary.warnings)
    assert ledger.assert_exact(1)["available"] == 13
    assert data[:32] in {material for _position, material in ledger.pool_keys("position = 0")}


def test_ingesting_again_adds_nothing(setup):
    app, keys, ledger = setup()
    write_keys(keys / "a.cor", 10)
    run(app)
    second = run(app)
    assert (second.files, second.keys, second.skipped) == (0, 0, 1)
    assert ledger.assert_exact(1)["ingested"] == 10


def test_odd_files_are_skipped_with_a_warning_and_the_rest_ingested(setup, tmp_path, monkeypatch):
    app, keys, ledger = setup()
    write_keys(keys / "good.cor", 4)
    write_keys(keys / "notes.txt", 4)
    (keys / "folder.cor").mkdir()
    outside = tmp_path / "outside.cor"
    write_keys(outside, 4)
    (keys / "outside-link.cor").symlink_to(outside)
    (keys / "inside-link.cor").symlink_to(keys / "good.cor")
    os.mkfifo(keys / "pipe.cor")
    write_keys(keys / "locked.cor", 4)
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if Path(path).name == "locked.cor":
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    # Tests run as root, for whom chmod 000 does not make a file unreadable.
    monkeypatch.setattr(ingest, "open", refusing_open, raising=False)
    summary = run(app)
    assert (summary.files, summary.keys) == (1, 4)
    warned = " ".join(summary.warnings)
    for name in ("notes.txt", "folder.cor", "outside-link.cor", "inside-link.cor", "pipe.cor", "locked.cor"):
        assert name in warned
    assert summary.skipped == 6
    assert ledger.assert_exact(1)["available"] == 4


def test_unreadable_key_directory_is_a_warning(setup):
    app, keys, ledger = setup()
    keys.rmdir()
    summary = run(app)
    assert summary.files == 0 and "cannot be read" in summary.warnings[0]


def test_interrupted_ingestion_resumes_without_duplicates(setup, monkeypatch):
    app, keys, ledger = setup()
    data = write_keys(keys / "a.cor", 35)
    monkeypatch.setattr(ingest, "BATCH_KEYS", 10)
    real_store = intake.store_keys
    calls = []

    def crash_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_store(*args, **kwargs)

    monkeypatch.setattr(intake, "store_keys", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(app)
    assert ledger.assert_exact(1)["ingested"] == 20
    monkeypatch.setattr(intake, "store_keys", real_store)
    summary = run(app)
    assert summary.keys == 15
    rows = ledger.pool_keys()
    assert [position for position, _ in rows] == list(range(35))
    assert b"".join(material for _, material in rows) == data


def test_pool_never_exceeds_max_key_count(setup):
    app, keys, ledger = setup(limits={"max_key_count": 12})
    write_keys(keys / "a.cor", 10)
    write_keys(keys / "b.cor", 10)
    summary = run(app)
    assert summary.keys == 10
    assert any("max_key_count" in warning for warning in summary.warnings)
    assert ledger.assert_exact(1)["available"] == 10
    assert (keys / "b.cor").exists()


def test_a_file_another_process_moved_on_meanwhile_is_left_to_it(setup):
    app, keys, ledger = setup()
    write_keys(keys / "a.cor", 10)
    with app.app_context():
        opened = intake.open_key_file(1, "a.cor")
        moved, _refused = intake.store_keys(1, 1, opened, [os.urandom(32) for _ in range(3)], 96, False, 100)
        with pytest.raises(IngestionHalted, match="another process"):
            intake.store_keys(1, 1, opened, [os.urandom(32) for _ in range(3)], 96, False, 100)

    assert moved.next_position == 3
    assert [position for position, _ in ledger.pool_keys()] == [0, 1, 2]


def test_delete_key_file_after_read_only_once_stored(setup):
    app, keys, ledger = setup(delete_key_file_after_read=True, limits={"max_key_count": 15})
    write_keys(keys / "a.cor", 10)
    write_keys(keys / "b.cor", 10)
    run(app)
    assert not (keys / "a.cor").exists()
    # b.cor did not fit: it stays on disk for a later run.
    assert (keys / "b.cor").exists()
    assert ledger.assert_exact(1)["available"] == 10


# The reader's memory: the statements it runs are the other tests' on both engines.
@pytest.mark.one_engine
def test_large_file_is_streamed_not_loaded(setup, monkeypatch):
    app, keys, ledger = setup()
    # Smaller batches keep the traced run short; memory must not follow file size.
    monkeypatch.setattr(ingest, "BATCH_KEYS", 512)
    size = 4 * 2**20
    write_keys(keys / "big.cor", size // 32)
    tracemalloc.start()
    try:
        summary = run(app)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.keys == size // 32
    assert peak < size / 4
    assert ledger.assert_exact(1)["available"] == size // 32


def test_progress_bar_run_ingests_too(setup, monkeypatch):
    app, keys, ledger = setup()
    monkeypatch.setattr(ingest, "PROGRESS_BAR_BYTES", 1)
    write_keys(keys / "a.cor", 10)
    with app.app_context():
        summary = ingest_directories(app.extensions["kme"], show_progress=True)
    assert summary.keys == 10


def test_cli_one_shot_prints_a_summary(tmp_path, pki):
    config = write_config(tmp_path, pki)
    write_keys(tmp_path / "keys" / "a.cor", 7)
    (tmp_path / "keys" / "junk.bin").write_bytes(b"x")
    result = run_cli(["ingest-keys"], config)
    assert result.returncode == 0, result.stderr
    assert "ingested 1 files, 7 keys; skipped 1; 1 warnings" in result.stdout
    assert "junk.bin" in result.stderr
    assert "Traceback" not in result.stderr
    again = run_cli(["ingest-keys"], config)
    assert "ingested 0 files, 0 keys" in again.stdout


def test_cli_refuses_a_missing_key_directory(tmp_path, pki):
    config = write_config(tmp_path, pki)
    (tmp_path / "keys").rmdir()
    result = run_cli(["ingest-keys"], config)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_cli_refuses_an_in_memory_database(tmp_path, pki):
    config = write_config(tmp_path, pki, sqlite_db_path=":memory:")
    config_text = config.read_text().replace('"sqlite_db_path": "kme.db",', "")
    config.write_text(config_text)
    result = run_cli(["ingest-keys", "--watch"], config)
    assert result.returncode != 0
    assert ":memory:" in result.stderr and "Traceback" not in result.stderr
