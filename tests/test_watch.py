"""The standalone ingestion worker (flask ingest-keys --watch): real watchdog events, real processes."""
import os
import time

import pytest

from tests.support import Ledger, sae_port, sae_session, start_ingest_worker, start_sae_interface, wait_until, \
    write_config, write_keys


@pytest.fixture
def kme(tmp_path, pki):
    config = write_config(tmp_path, pki)
    write_keys(tmp_path / "keys" / "first.cor", 5)
    worker = start_ingest_worker(config, tmp_path / "ingest.log")
    yield config, worker, Ledger(tmp_path / "kme.db")
    worker.stop()


def ingested_files(ledger) -> set[str]:
    return {name for (name,) in ledger._query("SELECT name FROM key_files WHERE complete")}


def test_existing_files_are_ingested_at_start(kme):
    _, worker, ledger = kme
    assert "ingested 1 files, 5 keys" in worker.output()
    assert ledger.assert_exact(1)["available"] == 5


def test_a_closed_file_is_served_within_one_second(kme, tmp_path, pki):
    config, _, _ = kme
    server = start_sae_interface(config, tmp_path / "gunicorn.log")
    try:
        session = sae_session(pki, 1, 1)
        url = f"https://127.0.0.1:{sae_port(config)}/api/v1/keys/2"
        assert session.get(f"{url}/status", timeout=10).json()["stored_key_count"] == 5
        write_keys(tmp_path / "keys" / "new.cor", 20)
        closed = time.monotonic()
        wait_until(lambda: session.get(f"{url}/status", timeout=10).json()["stored_key_count"] == 25, timeout=1.0)
        assert time.monotonic() - closed < 1.0
        assert len(session.post(f"{url}/enc_keys", json={"number": 25}, timeout=10).json()["keys"]) == 25
    finally:
        server.stop()


def test_a_file_being_written_is_not_ingested_before_it_is_closed(kme, tmp_path):
    _, _, ledger = kme
    keys = tmp_path / "keys"
    with open(keys / "slow.cor", "wb") as slow:
        slow.write(os.urandom(32 * 10))
        slow.flush()
        os.fsync(slow.fileno())
        # A later, complete file is our clock: once it is in, the worker has
        # seen every event that came before it.
        write_keys(keys / "marker.cor", 1)
        wait_until(lambda: "marker.cor" in ingested_files(ledger))
        assert "slow.cor" not in {name for (name,) in ledger._query("SELECT name FROM key_files")}
        slow.write(os.urandom(32 * 10))
    wait_until(lambda: "slow.cor" in ingested_files(ledger))
    assert ledger.assert_exact(1)["available"] == 5 + 1 + 20


def test_a_file_moved_into_the_directory_is_ingested(kme, tmp_path):
    _, _, ledger = kme
    staging = tmp_path / "staging.cor"
    write_keys(staging, 8)
    os.rename(staging, tmp_path / "keys" / "moved.cor")
    wait_until(lambda: "moved.cor" in ingested_files(ledger))
    assert ledger.assert_exact(1)["available"] == 13


def test_odd_files_while_watching_are_skipped_with_a_warning(kme, tmp_path):
    _, worker, ledger = kme
    write_keys(tmp_path / "keys" / "readme.txt", 2)
    (tmp_path / "keys" / "short.cor").write_bytes(os.urandom(40))
    wait_until(lambda: "short.cor" in ingested_files(ledger))
    wait_until(lambda: "readme.txt" in worker.output())
    assert "8 trailing bytes" in worker.output()
    assert ledger.assert_exact(1)["available"] == 6


def test_restart_ingests_nothing_again(kme, tmp_path):
    config, worker, ledger = kme
    worker.stop()
    again = start_ingest_worker(config, tmp_path / "ingest2.log")
    try:
        assert "ingested 0 files, 0 keys; skipped 1" in again.output()
        write_keys(tmp_path / "keys" / "after.cor", 3)
        wait_until(lambda: "after.cor" in ingested_files(ledger))
    finally:
        again.stop()
    assert "stopped;" in again.output()
    assert ledger.assert_exact(1)["ingested"] == 8


LEADS = "this worker runs the KME's periodic work"
FOLLOWS = "another worker of this KME runs its periodic work"


def test_two_workers_of_one_kme_ingest_each_key_once_and_one_runs_the_periodic_work(kme, tmp_path):
    config, first, ledger = kme
    second = start_ingest_worker(config, tmp_path / "ingest-2.log")
    try:
        wait_until(lambda: LEADS in first.output() and FOLLOWS in second.output())
        assert LEADS not in second.output()
        write_keys(tmp_path / "keys" / "both.cor", 40)
        wait_until(lambda: ledger.link(1)["ingested"] == 45)
        assert ledger.assert_exact(1)["available"] == 45
        assert ledger._query("SELECT count(*) FROM key_files WHERE name = 'both.cor' AND complete") == [(1,)]
        # The worker that ran the periodic work dies: the other takes it over.
        first.proc.kill()
        first.proc.wait()
        wait_until(lambda: LEADS in second.output(), timeout=20)
    finally:
        second.stop()
