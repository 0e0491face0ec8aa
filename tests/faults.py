"""Load with injected faults on a real KME pair, and the byte-level accounting check that ends every run.

Used by tests/test_fault_injection.py (short form) and bench/soak.py (long
form, with figures). Masters on both KMEs ask for keys for the other side
and for their own zone while processes are killed; slaves fetch what they
were given. Afterwards:

- every position of every key file was handed out at most once, and only
  in the key of one key ID;
- every key handed to a master is fetched exactly once by its slave, or
  was fetched already (a second fetch is refused);
- on both KMEs: ingested = available + reserved + peer_held + delivered +
  discarded, nothing reserved once settled, and the two ends of the link
  agree on what was delivered and what was discarded.
"""
import base64
import os
import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from tests.network import Network
from tests.support import children, kill_family, wait_until

# (KME, master SAE, slave SAE): across the link in both directions, and inside each zone.
PAIRS = ((1, 1, 3), (2, 3, 1), (1, 1, 2), (2, 3, 4))


@dataclass
class Figures:
    """What a run did."""

    requests: int = 0
    answered: int = 0
    refused: int = 0
    failed: int = 0
    faults: int = 0
    keys: int = 0
    fetched: int = 0

    def line(self) -> str:
        return (f"{self.requests} requests ({self.answered} served, {self.refused} refused with 503, "
                f"{self.failed} cut by a fault), {self.faults} faults injected, {self.keys} keys checked, "
                f"{self.fetched} fetched by slaves: 0 lost, 0 duplicated")


class FaultInjector:
    """Kills processes of the pair in turn (each by its own pid, all started by the test) and restarts them."""

    def __init__(self, network: Network, rng: random.Random):
        self.network, self.rng = network, rng

    def inject(self) -> str:
        kme = self.network[self.rng.choice((1, 2))]
        fault = self.rng.choice(("sae worker", "inter-KME interface", "ingestion worker"))
        if fault == "sae worker":
            # gunicorn's master replaces the worker; its requests in flight are cut.
            workers = children(kme.processes["sae"].proc.pid)
            if workers:
                os.kill(self.rng.choice(workers), signal.SIGKILL)
        else:
            name = "kme" if fault == "inter-KME interface" else "ingest"
            process = kme.processes.pop(name)
            kill_family(process)
            process.stop()
            kme.start(name)
        return f"{fault} of KME {kme.id}"


def run(network: Network, files: dict, requests_per_thread: int, threads: int, faults: int,
        seed: int = 7) -> Figures:
    """Load the pair while injecting ``faults`` faults; returns the figures once the accounting check passed."""
    rng = random.Random(seed)
    figures = Figures()
    served: list[tuple[int, int, int, dict]] = []
    lock = threading.Lock()
    done = threading.Event()

    injected = threading.Event()

    def worker(index: int) -> None:
        sessions = {}
        try:
            load(index, sessions)
        finally:
            for session in sessions.values():
                session.close()

    def load(index: int, sessions: dict) -> None:
        local_rng = random.Random(seed * 1000 + index)
        # At least requests_per_thread, and on until every fault is injected (bounded either way).
        for count in range(requests_per_thread * 50):
            if count >= requests_per_thread and injected.is_set():
                break
            kme, master, slave = local_rng.choice(PAIRS)
            if (kme, master) not in sessions:
                sessions[(kme, master)] = network[kme].sae(master)
            session = sessions[(kme, master)]
            try:
                response = session.post(f"{network[kme].url()}/keys/{slave}/enc_keys",
                                        json={"number": local_rng.randint(1, 3),
                                              "size": local_rng.choice((256, 512))}, timeout=30)
            except requests.RequestException:
                with lock:
                    figures.requests += 1
                    figures.failed += 1
                continue
            with lock:
                figures.requests += 1
                if response.status_code == 200:
                    figures.answered += 1
                    served.extend((kme, master, slave, key) for key in response.json()["keys"])
                else:
                    assert response.status_code == 503, response.text
                    assert response.headers["Content-Type"] == "application/json"
                    figures.refused += 1

    def injector() -> None:
        faulty = FaultInjector(network, rng)
        try:
            for _ in range(faults):
                if done.wait(rng.uniform(0.3, 1.0)):
                    return
                faulty.inject()
                figures.faults += 1
        finally:
            injected.set()

    injecting = threading.Thread(target=injector)
    injecting.start()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, range(threads)))
    finally:
        done.set()
        injecting.join()
    settle(network)
    check(network, files, served, figures)
    return figures


def settle(network: Network) -> None:
    """Wait until every process is up and no activation is pending at either KME."""
    for kme in network.kmes.values():
        for name in ("ingest", "sae", "kme"):
            if name not in kme.processes or kme.processes[name].proc.poll() is not None:
                kme.stop(name)
                kme.start(name)
    wait_until(lambda: all(kme.ledger._query("SELECT COUNT(*) FROM outgoing_activations") == [(0,)]
                           for kme in network.kmes.values()), timeout=60)


def check(network: Network, files: dict, served: list, figures: Figures) -> None:
    """The byte-level accounting check (see the module docstring)."""
    positions = {}
    for kme, master, slave, key in served:
        material = base64.b64decode(key["key"])
        parts = [material[i:i + 32] for i in range(0, len(material), 32)]
        for part in parts:
            where = [(name, data.find(part)) for name, data in files.items() if data.find(part) >= 0]
            assert len(where) == 1 and where[0][1] % 32 == 0, "a key part is not one position of one file"
            spot = (where[0][0], where[0][1] // 32)
            assert spot not in positions, f"position {spot} was handed out twice"
            positions[spot] = key["key_ID"]
    figures.keys = len(served)
    by_slave: dict = {}
    for kme, master, slave, key in served:
        by_slave.setdefault((kme, master, slave), []).append(key)
    for (kme, master, slave), keys in by_slave.items():
        slave_kme = network[2 if slave in (3, 4) else 1]
        with slave_kme.sae(slave) as session:
            fetch_each_once(session, f"{slave_kme.url()}/keys/{master}/dec_keys", keys, figures)
    for kme, peer in ((1, 1), (1, 2), (2, 2), (2, 1)):
        counts = network[kme].ledger.assert_exact(peer)
        assert counts["reserved"] == 0, counts
    one, two = network[1].ledger.link(2), network[2].ledger.link(1)
    assert (one["delivered"], one["discarded"]) == (two["delivered"], two["discarded"]), (one, two)


def fetch_each_once(session, url: str, keys: list[dict], figures: Figures) -> None:
    """Each key fetched by its slave: the first time it is answered, the second time refused."""
    for key in keys:
        first = session.get(url, params={"key_ID": key["key_ID"]}, timeout=30)
        assert first.status_code == 200 and first.json()["keys"] == [key], first.text
        again = session.get(url, params={"key_ID": key["key_ID"]}, timeout=30)
        assert again.status_code == 400
        figures.fetched += 1


def started_pair(folder, pki, keys_per_file: int) -> tuple[Network, dict]:
    """A KME pair with a link file and a zone file on each side, ingested; the files' contents by name."""
    network = Network(folder, pki, [(1, 2)], key_expiry_seconds=3600)
    files = {"link.cor": network.write_link_file(1, 2, "link.cor", keys_per_file)}
    for kme in (1, 2):
        files[f"zone-{kme}.cor"] = network.write_link_file(kme, kme, f"zone-{kme}.cor", keys_per_file)
    network.start_all()
    wait_until(lambda: all(network[k].ledger.link(p)["ingested"] == keys_per_file
                           for k, p in ((1, 1), (1, 2), (2, 1), (2, 2))), timeout=60)
    return network, files
