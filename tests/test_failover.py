"""A PostgreSQL failover under a real KME: a streaming standby on loopback (pg_basebackup), promoted.

Asynchronous: the standby stops receiving while keys are handed out, the
primary dies, the standby is promoted behind it: the KME refuses to hand
out keys until `flask restored-from-backup`, then serves keys of new files
only. Synchronous: the standby has every commit, nothing is refused and no
key is handed out twice.
"""
import base64
import json

import pytest

from tests import support
from tests.postgres import Cluster
from tests.support import (
    Ledger,
    free_port,
    run_cli,
    sae_port,
    sae_session,
    start_ingest_worker,
    start_sae_interface,
    wait_until,
    write_config,
    write_keys,
)

pytestmark = pytest.mark.postgresql_only

BEHIND = "the database is behind what this KME already handed out"


class Kme:
    """One KME (its local zone only) on a database of ``cluster``, which a failover replaces."""

    def __init__(self, folder, pki, cluster: Cluster):
        self.folder, self.pki = folder, pki
        cluster.admin("CREATE DATABASE kme")
        self.config = write_config(folder, pki, db_uri=cluster.uri("kme"))
        self.ledger = Ledger(folder / "kme.db")
        self.use(cluster)
        self.processes = []

    def use(self, cluster: Cluster) -> None:
        """Point the configuration (and the test's ledger) at ``cluster``."""
        raw = json.loads(self.config.read_text())
        raw["this_kme"]["db_uri"] = cluster.uri("kme")
        self.config.write_text(json.dumps(raw))
        support._databases[self.folder.resolve()] = cluster.uri("kme")

    def start(self) -> None:
        self.processes = [start_ingest_worker(self.config, self.folder / "ingest.log"),
                          start_sae_interface(self.config, self.folder / "sae.log")]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes = []

    def enc_keys(self, number: int):
        return sae_session(self.pki, 1, 1).post(f"https://127.0.0.1:{sae_port(self.config)}/api/v1/keys/2/enc_keys",
                                                json={"number": number}, timeout=15)

    def taken(self, number: int) -> set[bytes]:
        answer = self.enc_keys(number)
        assert answer.status_code == 200, answer.text
        return {base64.b64decode(key["key"]) for key in answer.json()["keys"]}


@pytest.fixture
def primary():
    cluster = Cluster(free_port(), durable=False)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def standby(primary):
    cluster = Cluster(free_port(), durable=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def kme(tmp_path, pki, primary):
    kme = Kme(tmp_path, pki, primary)
    write_keys(tmp_path / "keys" / "zone.cor", 200)
    kme.start()
    wait_until(lambda: kme.ledger.link(1)["ingested"] == 200, timeout=20)
    yield kme
    kme.stop()


def caught_up(primary: Cluster, standby: Cluster) -> bool:
    (sent,) = primary.query("kme", "SELECT pg_current_wal_lsn()::text")
    (replayed,) = standby.query("kme", "SELECT pg_last_wal_replay_lsn()::text")
    return standby.query("kme", f"SELECT pg_wal_lsn_diff('{replayed}', '{sent}') >= 0")[0]


def fail_over(kme: Kme, primary: Cluster, standby: Cluster, standby_stopped: bool) -> None:
    """The primary dies; the standby is promoted and the KME restarted on it (as a failover manager would)."""
    kme.stop()
    primary.stop_server()
    if standby_stopped:
        standby.start_server()
    standby.promote()
    kme.use(standby)
    kme.start()


def test_a_failover_to_a_standby_behind_the_primary_hands_out_no_key_twice(kme, primary, standby):
    standby.start_as_standby_of(primary)
    handed = kme.taken(10)
    wait_until(lambda: caught_up(primary, standby), timeout=20)
    # The standby loses its primary: what is handed out from now on exists on the primary alone.
    standby.stop_server()
    handed |= kme.taken(40)

    fail_over(kme, primary, standby, standby_stopped=True)
    refused = kme.enc_keys(1)
    assert refused.status_code == 503 and BEHIND in refused.json()["message"], refused.text
    kme.stop()
    done = run_cli(["restored-from-backup"], kme.config)
    assert done.returncode == 0, done.stderr
    assert "link 1: 190 keys set aside" in done.stdout
    kme.start()
    fresh = write_keys(kme.folder / "keys" / "zone-2.cor", 30)
    wait_until(lambda: kme.ledger.link(1)["ingested"] == 230, timeout=20)
    served = kme.taken(30)
    assert not served & handed
    assert served == {fresh[i:i + 32] for i in range(0, len(fresh), 32)}
    kme.ledger.assert_exact(1)


def test_a_failover_to_a_synchronous_standby_loses_nothing_and_refuses_nothing(kme, primary, standby):
    standby.start_as_standby_of(primary)
    primary.admin("ALTER SYSTEM SET synchronous_standby_names = '*'")
    primary.admin("SELECT pg_reload_conf()")
    wait_until(lambda: primary.query("postgres", "SELECT count(*) FROM pg_stat_replication "
                                                 "WHERE sync_state = 'sync'")[0] == 1, timeout=20)
    handed = kme.taken(10) | kme.taken(40)

    fail_over(kme, primary, standby, standby_stopped=False)
    served = kme.taken(100)
    assert not served & handed
    counts = kme.ledger.assert_exact(1)
    assert (counts["delivered"], counts["available"]) == (150, 50)
