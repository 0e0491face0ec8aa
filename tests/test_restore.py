"""A KME whose database went back in time hands out no key twice: real KMEs, an online SQLite backup restored.

The backup is taken with SQLite's backup API while the KME serves, keys are
handed out after it, then the database file is replaced by the backup and
the KME restarted: it refuses to hand out keys (503, /healthz) until an
operator runs `flask restored-from-backup`, then serves keys of new files
only. The link variant checks both ends.
"""
import base64
import shutil
import sqlite3
from pathlib import Path

import pytest
from watchdog.events import FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from kme.operations import key_folders
from kme.storage import handout_mark
from tests.network import Network
from tests.support import run_cli, wait_until, write_keys

pytestmark = pytest.mark.sqlite_only

BEHIND = "the database is behind what this KME already handed out"


@pytest.fixture
def network(tmp_path, pki):
    network = Network(tmp_path, pki, [(1, 2)])
    write_keys(network[1].link_folder(1) / "zone.cor", 200)
    network.write_link_file(1, 2, "link.cor", 200)
    network.start_all()
    wait_until(lambda: network[1].ledger.link(1)["ingested"] == 200, timeout=20)
    network.wait_for_link(1, 2, 200)
    yield network
    network.stop_all()


def enc_keys(network, slave: int, number: int):
    kme = network[1]
    return kme.sae(1).post(f"{kme.url()}/keys/{slave}/enc_keys", json={"number": number}, timeout=15)


def dec_keys(network, kme_id: int, slave: int, keys: list[dict]):
    kme = network[kme_id]
    return kme.sae(slave).post(f"{kme.url()}/keys/1/dec_keys",
                               json={"key_IDs": [{"key_ID": key["key_ID"]} for key in keys]}, timeout=15)


def taken(network, slave: int, number: int) -> list[dict]:
    answer = enc_keys(network, slave, number)
    assert answer.status_code == 200, answer.text
    return answer.json()["keys"]


def materials(keys: list[dict]) -> set[bytes]:
    return {base64.b64decode(key["key"]) for key in keys}


def back_up(kme, to) -> None:
    """SQLite's online backup of a KME's database while it serves."""
    source, target = sqlite3.connect(kme.ledger.db_path), sqlite3.connect(to)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def restore(kme, copy) -> None:
    """Stop the KME, put the backup in place of its database, start it again."""
    kme.stop()
    for suffix in ("-wal", "-shm"):
        kme.ledger.db_path.with_name(kme.ledger.db_path.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(copy, kme.ledger.db_path)
    kme.start()


def health(kme) -> dict:
    return kme.sae(1).get(f"{kme.url().removesuffix('/api/v1')}/healthz", timeout=10).json()


def recover(kme) -> str:
    kme.stop()
    done = run_cli(["restored-from-backup"], kme.config)
    assert done.returncode == 0, done.stderr
    again = run_cli(["restored-from-backup"], kme.config)
    assert again.returncode != 0 and "not behind the hand-out mark" in again.stderr
    kme.start()
    return done.stdout


def test_keys_handed_out_wake_no_watch_of_the_key_folders(network):
    # The hand-out mark is read and raised at every hand-out. In the watched key folder, each of those woke the
    # ingestion worker's watch (open, write, close: five inotify events a request), which cost a remote
    # activation two thirds of its speed under load (bench/relay.py).
    # The first hand-out makes the mark's folder.
    taken(network, 2, 1)
    seen = []
    handler = FileSystemEventHandler()
    handler.on_any_event = seen.append
    observer = InotifyObserver()
    zone = network[1].link_folder(1)
    for folder in (zone, network[1].link_folder(2)):
        observer.schedule(handler, str(folder), recursive=False)
    observer.start()
    try:
        keys = taken(network, 3, 5)
        assert dec_keys(network, 2, 3, keys).status_code == 200
        taken(network, 2, 5)
        # Events of one watch arrive in order: once the sentinel's is seen, every earlier one has been.
        (zone / "sentinel").write_bytes(b"")
        wait_until(lambda: any(event.src_path.endswith("sentinel") for event in seen))
    finally:
        observer.stop()
        observer.join(10)
    # The sentinel's creation modifies the folder too: nothing else happened in it. A periodic rescan may have
    # read the folder marks meanwhile (once every rescan_interval_seconds, whatever the load): hand-outs never
    # touch them.
    touched = {event.src_path for event in seen if not Path(event.src_path).name.startswith(key_folders.MARK_PREFIX)}
    assert touched - {str(zone)} == {str(zone / "sentinel")}
    assert handout_mark.read(zone)[1] >= 11


def test_a_restored_database_hands_out_no_zone_key_twice(network, tmp_path):
    kme = network[1]
    # Taken before the backup, fetched after it: the backup still has them waiting.
    waiting = taken(network, 2, 10)
    back_up(kme, tmp_path / "backup.db")
    assert dec_keys(network, 1, 2, waiting).status_code == 200
    later = taken(network, 2, 40)
    handed = materials(waiting) | materials(later)

    restore(kme, tmp_path / "backup.db")
    refused = enc_keys(network, 2, 1)
    assert refused.status_code == 503 and BEHIND in refused.json()["message"], refused.text
    assert enc_keys(network, 3, 1).status_code == 503
    again = dec_keys(network, 1, 2, waiting)
    assert again.status_code == 503 and BEHIND in again.json()["message"]
    report = health(kme)
    assert report["status"] == "unhealthy" and BEHIND in report["checks"]["database"]

    said = recover(kme)
    assert "link 1: 190 keys set aside, 10 keys waiting for their slaves erased, 1 key files read no further" in said
    assert health(kme)["checks"]["database"] == "ok"
    empty = enc_keys(network, 2, 1)
    assert empty.status_code == 503 and empty.json()["message"].startswith("not enough key material")
    assert dec_keys(network, 1, 2, waiting).status_code == 400
    fresh = write_keys(kme.link_folder(1) / "zone-2.cor", 30)
    wait_until(lambda: kme.ledger.link(1)["ingested"] == 230, timeout=20)
    served = materials(taken(network, 2, 30))
    assert not served & handed
    assert served == {fresh[i:i + 32] for i in range(0, len(fresh), 32)}
    kme.ledger.assert_exact(1)


def test_a_restored_database_at_one_end_of_a_link_hands_out_no_key_twice(network, tmp_path):
    kme1, kme2 = network[1], network[2]
    before = taken(network, 3, 10)
    back_up(kme1, tmp_path / "backup.db")
    later = taken(network, 3, 30)
    assert dec_keys(network, 2, 3, before + later).status_code == 200
    handed = materials(before) | materials(later)

    restore(kme1, tmp_path / "backup.db")
    refused = enc_keys(network, 3, 1)
    assert refused.status_code == 503 and BEHIND in refused.json()["message"], refused.text

    recover(kme1)
    # The peer learns the new database and sets its own free keys of the old file aside.
    wait_until(lambda: kme2.ledger.link(1)["available"] + kme2.ledger.link(1)["peer_held"] == 0, timeout=30)
    fresh = network.write_link_file(1, 2, "link-2.cor", 50)
    wait_until(lambda: all(kme.ledger.link(peer)["ingested"] == 250 and kme.ledger.link(peer)["unconfirmed"] == 0
                           for kme, peer in ((kme1, 2), (kme2, 1))), timeout=30)
    keys = taken(network, 3, 20)
    served = materials(keys)
    assert not served & handed
    assert served <= {fresh[i:i + 32] for i in range(0, len(fresh), 32)}
    assert materials(dec_keys(network, 2, 3, keys).json()["keys"]) == served
    for kme, peer in ((kme1, 2), (kme2, 1)):
        kme.ledger.assert_exact(peer)
    positions = [set(kme.ledger._query("SELECT f.name, p.position FROM pool_keys p JOIN key_files f "
                                       "ON f.id = p.file_id WHERE p.link_id = ?", peer))
                 for kme, peer in ((kme1, 2), (kme2, 1))]
    assert positions[0] == positions[1]
