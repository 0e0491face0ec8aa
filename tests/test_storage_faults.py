"""Storage faults on a running KME: a full disk, a read-only database, a deleted database file.

The disk faults use a small tmpfs mounted for the test (root only, as in CI):
the database lives there, the key files and metrics elsewhere.
"""
import os
import subprocess

import pytest
import requests

from tests.support import (
    Ledger,
    run_cli,
    sae_port,
    sae_session,
    start_ingest_worker,
    start_sae_interface,
    wait_until,
    write_config,
    write_keys,
)

pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


class RunningKme:
    """Ingestion worker and SAE interface of one KME whose database file is ``database``."""

    def __init__(self, tmp_path, pki, database, keys=100):
        self.config = write_config(tmp_path / "kme", pki, sqlite_db_path=str(database),
                                   housekeeping_interval_seconds=0.2, rescan_interval_seconds=0.5)
        self.keys = tmp_path / "kme" / "keys"
        if keys:
            write_keys(self.keys / "first.cor", keys)
        self.ledger = Ledger(database)
        self.worker = start_ingest_worker(self.config, tmp_path / "ingest.log")
        self.sae = start_sae_interface(self.config, tmp_path / "sae.log")
        self.session = sae_session(pki, 1, 1)
        self.url = f"https://127.0.0.1:{sae_port(self.config)}"

    def health(self) -> requests.Response:
        return self.session.get(f"{self.url}/healthz", timeout=10)

    def enc_keys(self) -> requests.Response:
        return self.session.get(f"{self.url}/api/v1/keys/2/enc_keys", timeout=10)

    def alive(self) -> bool:
        return self.worker.proc.poll() is None and self.sae.proc.poll() is None

    def stop(self) -> None:
        self.session.close()
        self.sae.stop()
        self.worker.stop()


@pytest.fixture
def running(tmp_path, pki, disk):
    kme = RunningKme(tmp_path, pki, disk / "kme.db")
    wait_until(lambda: kme.health().status_code == 200)
    yield kme
    kme.stop()


def database_check(kme) -> str:
    return kme.health().json().get("checks", {}).get("database", "")


def fill(folder) -> None:
    # Unbuffered: a buffered file would raise the full disk again when it is closed, with its last bytes.
    with open(folder / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(bytes(64 * 1024))
        except OSError:
            pass


def test_a_full_disk_is_reported_survived_and_recovered_from(running, disk):
    kme = running
    fill(disk)
    wait_until(lambda: "disk is full" in database_check(kme), timeout=30)
    assert kme.health().status_code == 503
    refused = kme.enc_keys()
    assert refused.status_code == 503 and refused.json()["message"].startswith("key data access error")
    write_keys(kme.keys / "second.cor", 50)
    assert kme.alive()

    (disk / "filler").unlink()
    wait_until(lambda: kme.health().status_code == 200, timeout=30)
    wait_until(lambda: kme.ledger.link(1)["ingested"] == 150, timeout=30)
    assert kme.enc_keys().status_code == 200
    assert kme.alive()
    kme.ledger.assert_exact(1)


def test_a_read_only_database_is_reported_and_writes_recover_without_a_restart(tmp_path, pki, disk):
    config = write_config(tmp_path / "kme", pki, sqlite_db_path=str(disk / "kme.db"))
    write_keys(tmp_path / "kme" / "keys" / "first.cor", 100)
    assert run_cli(["ingest-keys"], config).returncode == 0
    # Read-only before the KME starts: its processes open the database as they find it.
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    try:
        kme = RunningKme(tmp_path, pki, disk / "kme.db", keys=0)
    except BaseException:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        raise
    try:
        wait_until(lambda: kme.health().status_code == 503 and database_check(kme), timeout=30)
        assert "read-only" in database_check(kme) or "cannot be opened" in database_check(kme)
        refused = kme.enc_keys()
        assert refused.status_code == 503 and refused.json()["message"].startswith("key data access error: ")
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        wait_until(lambda: kme.enc_keys().status_code == 200, timeout=30)
        write_keys(kme.keys / "second.cor", 10)
        wait_until(lambda: kme.ledger.link(1)["ingested"] == 110, timeout=30)
        # The background worker's heartbeat resumes at the end of its backoff.
        wait_until(lambda: kme.health().status_code == 200, timeout=30)
        assert kme.alive()
        kme.ledger.assert_exact(1)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        kme.stop()


def test_a_deleted_database_is_refused_by_every_process(tmp_path, pki):
    kme = RunningKme(tmp_path, pki, tmp_path / "kme.db")
    try:
        wait_until(lambda: kme.health().status_code == 200)
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"kme.db{suffix}").unlink(missing_ok=True)
        refused = kme.enc_keys()
        assert refused.status_code == 503 and "was deleted while the KME was running" in refused.json()["message"]
        assert "was deleted" in database_check(kme)
        write_keys(kme.keys / "after.cor", 10)
        wait_until(lambda: "was deleted" in kme.worker.output())
        assert kme.alive()
        assert not (tmp_path / "kme.db").exists()
    finally:
        kme.stop()
