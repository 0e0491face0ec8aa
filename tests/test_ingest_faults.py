"""Ingestion under operator mistakes: renamed, copied, growing and oddly named files, a lost database."""
import os
import shutil

import pytest

from kme import create_app
from kme.config import load_config
from kme.operations import health
from kme.operations.ingest import ingest_directories
from kme.operations.key_folders import mark_name
from kme.storage.schema import ensure_schema
from tests.network import Network
from tests.support import Ledger, lose_database, run_cli, start_ingest_worker, wait_until, write_config, write_keys


class InProcess:
    """A KME configuration with its app, for ingestion in this process (a new one = a restarted KME)."""

    def __init__(self, config_path):
        self.config_path = config_path
        self.app = create_app(load_config(config_path))
        self.ledger = Ledger(config_path.parent / "kme.db")
        with self.app.app_context():
            ensure_schema()

    def ingest(self):
        with self.app.app_context():
            return ingest_directories(self.app.extensions["kme"])

    def events(self) -> list[str]:
        return [message for (message,) in self.ledger._query("SELECT message FROM events")]


@pytest.fixture
def kme(tmp_path, pki):
    return InProcess(write_config(tmp_path / "kme", pki))


def keys_folder(kme) -> "os.PathLike":
    return kme.config_path.parent / "keys"


def test_a_renamed_or_copied_file_adds_no_key_twice(kme):
    folder = keys_folder(kme)
    data = write_keys(folder / "a.cor", 10)
    assert kme.ingest().keys == 10
    os.rename(folder / "a.cor", folder / "b.cor")
    shutil.copy(folder / "b.cor", folder / "c.cor")
    summary = kme.ingest()
    assert (summary.keys, summary.duplicates) == (0, 20)
    assert any("ingested before" in warning for warning in summary.warnings)
    assert any("c.cor on link 1: 10 keys refused" in event for event in kme.events())
    counts = kme.ledger.assert_exact(1)
    assert counts["ingested"] == 10
    materials = [material for _position, material in kme.ledger.pool_keys()]
    assert sorted(materials) == sorted(data[i:i + 32] for i in range(0, len(data), 32))


def test_a_file_that_repeats_a_key_gives_it_once(kme):
    (keys_folder(kme) / "zeros.cor").write_bytes(bytes(32 * 8))
    summary = kme.ingest()
    assert (summary.keys, summary.duplicates) == (1, 7)
    assert kme.ledger.assert_exact(1)["available"] == 1


def test_repeats_inside_a_file_keep_each_materials_first_position(kme):
    a, b, c = (bytes([value]) * 32 for value in (1, 2, 3))
    (keys_folder(kme) / "mixed.cor").write_bytes(a + b + a + c + b + b)
    summary = kme.ingest()
    assert (summary.keys, summary.duplicates) == (3, 3)
    rows = kme.ledger.pool_keys()
    assert [tuple(row) for row in rows] == [(0, a), (1, b), (3, c)]


def test_a_file_copied_into_another_links_folder_adds_nothing(tmp_path, pki):
    network = Network(tmp_path, pki, [(1, 2)])
    kme1 = InProcess(network[1].config)
    write_keys(network[1].link_folder(1) / "zone.cor", 6)
    assert kme1.ingest().keys == 6
    shutil.copy(network[1].link_folder(1) / "zone.cor", network[1].link_folder(2) / "zone.cor")
    assert kme1.ingest().duplicates == 6
    assert kme1.ledger.assert_exact(2)["ingested"] == 0


def test_fingerprints_outlive_the_keys_they_stand_for(kme):
    folder = keys_folder(kme)
    write_keys(folder / "a.cor", 4)
    kme.ingest()
    with kme.app.app_context():
        from kme.storage.keystore.local import deliver_local
        deliver_local(1, 1, [2], 4, 256)
    shutil.copy(folder / "a.cor", folder / "again.cor")
    assert kme.ingest().duplicates == 4
    assert kme.ledger.assert_exact(1)["available"] == 0


def test_bytes_appended_to_an_ingested_file_are_ingested_as_more_keys(kme):
    folder = keys_folder(kme)
    first = os.urandom(32 * 10 + 5)
    (folder / "grows.cor").write_bytes(first)
    assert kme.ingest().keys == 10
    with open(folder / "grows.cor", "ab") as handle:
        handle.write(os.urandom(32 * 5 - 5))
    summary = kme.ingest()
    assert summary.keys == 5
    assert any("grew from 325 to 480 bytes" in warning for warning in summary.warnings)
    assert any("grows.cor on link 1 grew after it was ingested: reading on from position 10" in event
               for event in kme.events())
    positions = [row[0] for row in kme.ledger._query("SELECT position FROM pool_keys ORDER BY position")]
    assert positions == list(range(15))
    # The key that straddles the old end is made of the old trailing bytes and the new ones.
    straddling = kme.ledger.pool_keys("position = 10")[0][1]
    assert straddling[:5] == first[-5:]
    assert kme.ingest().keys == 0


def test_a_name_that_is_not_utf8_is_skipped_with_an_escaped_warning(kme):
    folder = os.fsencode(keys_folder(kme))
    with open(os.path.join(folder, b"bad\xff\n.cor"), "wb") as handle:
        handle.write(os.urandom(64))
    write_keys(keys_folder(kme) / "good.cor", 3)
    summary = kme.ingest()
    assert summary.keys == 3
    assert any("bad\\xff\\n.cor: file name is not valid UTF-8" in warning for warning in summary.warnings)


def test_a_lost_database_does_not_ingest_the_folders_again_until_an_operator_decides(tmp_path, pki):
    config = write_config(tmp_path / "kme", pki)
    folder = config.parent / "keys"
    write_keys(folder / "old.cor", 5)
    assert InProcess(config).ingest().keys == 5
    assert (folder / mark_name(1)).exists()
    lose_database(config.parent)
    fresh = InProcess(config)
    summary = fresh.ingest()
    assert summary.keys == 0
    assert any("was ingested by another database" in warning for warning in summary.warnings)
    # Also in a process that has only ever answered /healthz (it never ran ensure_schema).
    for app in (fresh.app, create_app(load_config(config))):
        with app.app_context():
            healthy, report = health.check(app.extensions["kme"])
        assert not healthy and "adopt-key-folders" in report["checks"]["key_directories"]
    assert run_cli(["ingest-keys"], config).stdout.startswith("ingested 0 files, 0 keys")

    adopted = run_cli(["adopt-key-folders", "--existing", "used"], config)
    assert adopted.returncode == 0, adopted.stderr
    assert "1 files present retired" in adopted.stdout
    write_keys(folder / "new.cor", 2)
    summary = fresh.ingest()
    assert summary.keys == 2
    assert fresh.ledger.assert_exact(1)["ingested"] == 2
    assert any("old.cor on link 1 retired by an operator" in event for event in fresh.events())


def test_adopting_folders_whose_keys_were_never_used_ingests_them(tmp_path, pki):
    config = write_config(tmp_path / "kme", pki)
    write_keys(config.parent / "keys" / "old.cor", 5)
    InProcess(config).ingest()
    lose_database(config.parent)
    adopted = run_cli(["adopt-key-folders", "--existing", "new"], config)
    assert adopted.returncode == 0 and "ingested as new keys" in adopted.stdout
    assert InProcess(config).ingest().keys == 5


def test_adopt_needs_an_explicit_choice(tmp_path, pki):
    result = run_cli(["adopt-key-folders"], write_config(tmp_path / "kme", pki))
    assert result.returncode != 0 and "--existing" in result.stderr


def test_a_file_still_open_for_writing_at_start_waits_until_it_is_complete(tmp_path, pki):
    config = write_config(tmp_path / "kme", pki)
    ledger = Ledger(tmp_path / "kme" / "kme.db")
    with open(tmp_path / "kme" / "keys" / "slow.cor", "wb") as slow:
        slow.write(os.urandom(32 * 1000))
        slow.flush()
        worker = start_ingest_worker(config, tmp_path / "ingest.log")
        try:
            assert "1 files still being written" in worker.output()
            assert ledger.link(1)["ingested"] == 0
            slow.write(os.urandom(32 * 1000))
        except BaseException:
            worker.stop()
            raise
    try:
        wait_until(lambda: ledger.link(1)["ingested"] == 2000)
        assert ledger._query("SELECT next_position, complete FROM key_files") == [(2000, 1)]
    finally:
        worker.stop()


def test_a_file_that_arrives_without_a_close_event_is_found_by_the_rescan(tmp_path, pki):
    config = write_config(tmp_path / "kme", pki, rescan_interval_seconds=0.5, housekeeping_interval_seconds=0.2)
    ledger = Ledger(tmp_path / "kme" / "kme.db")
    worker = start_ingest_worker(config, tmp_path / "ingest.log")
    try:
        write_keys(tmp_path / "outside.cor", 7)
        # A hard link makes only a creation event, which the watcher ignores.
        os.link(tmp_path / "outside.cor", tmp_path / "kme" / "keys" / "linked.cor")
        wait_until(lambda: ledger.link(1)["ingested"] == 7)
    finally:
        worker.stop()


def test_the_worker_survives_odd_names_and_keeps_ingesting(tmp_path, pki):
    config = write_config(tmp_path / "kme", pki)
    folder = os.fsencode(tmp_path / "kme" / "keys")
    with open(os.path.join(folder, b"\xfe\xff.cor"), "wb") as handle:
        handle.write(os.urandom(64))
    with open(os.path.join(folder, b"evil\nFORGED line.cor"), "wb") as handle:
        handle.write(os.urandom(64))
    ledger = Ledger(tmp_path / "kme" / "kme.db")
    worker = start_ingest_worker(config, tmp_path / "ingest.log")
    try:
        write_keys(tmp_path / "kme" / "keys" / "after.cor", 3)
        wait_until(lambda: ledger.link(1)["ingested"] == 2 + 3)
        assert worker.proc.poll() is None
        lines = worker.output().splitlines()
        assert any("\\xfe\\xff.cor: file name is not valid UTF-8" in line for line in lines)
        assert not any(line.startswith("FORGED") for line in lines)
        assert any("evil\\nFORGED line.cor" in message for (message,) in ledger._query("SELECT message FROM events"))
    finally:
        worker.stop()
