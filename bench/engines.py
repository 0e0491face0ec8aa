"""enc_keys and dec_keys on SQLite and on PostgreSQL, through one and through two front ends, in one run.

Usage: .venv/bin/python bench/engines.py [seconds per measurement, default 3] [repetitions, default 3]

For each engine a KME (alone, its zone's pool filled with 300 000 keys) on
127.0.0.1: its ingestion worker and one SAE interface (2 workers x 8
threads, the product's defaults), then a second SAE interface of the same
configuration on another port, as a second host would run it. PostgreSQL is
a throwaway cluster of this run (tests/postgres.py, fsync on, the server's
defaults otherwise). The 8 client processes of bench/web_stack.py load one
front end, or 4 each on two; the four set-ups are measured interleaved, each
repetition in turn, and the table gives medians of requests/s, p50 and p99.
Both front ends share this machine's 2 cores with the clients and the
database: the second one shows what the coordination between front ends
costs, not the capacity another host would add.
"""
import multiprocessing
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kme.operations.certs import generate_pki  # noqa: E402
from tests.conftest import PKI_LAYOUT  # noqa: E402
from tests.postgres import Cluster  # noqa: E402
from tests.support import (  # noqa: E402
    PASSWORD,
    Pki,
    free_port,
    sae_port,
    sae_session,
    start_ingest_worker,
    start_sae_interface,
    wait_until,
    write_config,
    write_keys,
)
from web_stack import CLIENTS, _client  # noqa: E402

KEYS = 300_000
CALLS = [("enc_keys, number=1", "/api/v1/keys/2/enc_keys", {}),
         ("dec_keys", "/api/v1/keys/1/dec_keys", {"sae": 2, "dec_keys": 1280})]


class Setup:
    """One KME on one engine, with its second front end started or not."""

    def __init__(self, folder: Path, pki: Pki, engine: str, cluster: Cluster | None):
        extra = {"db_uri": cluster.new_database()} if engine == "postgresql" else {}
        self.engine = engine
        self.config = write_config(folder, pki, **extra)
        write_keys(folder / "keys" / "pool.cor", KEYS)
        self.processes = [start_ingest_worker(self.config, folder / "ingest.log")]
        self.processes.append(start_sae_interface(self.config, folder / "sae.log", threads=8))
        self.second_port = free_port()
        self.processes.append(start_sae_interface(self.config, folder / "sae-b.log", threads=8,
                                                  port=self.second_port))
        self.bases = [f"https://127.0.0.1:{sae_port(self.config)}", f"https://127.0.0.1:{self.second_port}"]
        status = sae_session(pki, 1, 1)
        wait_until(lambda: status.get(f"{self.bases[0]}/api/v1/keys/2/status", timeout=10).json()[
            "stored_key_count"] == KEYS, timeout=300)
        status.close()

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def load(pool, pki: Pki, bases: list[str], path: str, seconds: float, options: dict) -> dict:
    """CLIENTS client processes spread over ``bases``: requests/s, p50 and p99 in ms, failures."""
    jobs = [{"pki": str(pki.folder), "url": bases[index % len(bases)] + path, "base": bases[index % len(bases)],
             "seconds": seconds, "sae": options.get("sae", 1), **options} for index in range(CLIENTS)]
    results = pool.map(_client, jobs)
    latencies = sorted(latency for _, chunk, _ in results for latency in chunk)
    return {"rate": sum(rate for rate, _, _ in results), "p50": statistics.median(latencies) * 1e3,
            "p99": latencies[int(len(latencies) * 0.99)] * 1e3, "failures": sum(f for _, _, f in results)}


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    repetitions = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    folder = Path(tempfile.mkdtemp(prefix="kme-bench-engines-"))
    pki = Pki(folder / "pki", generate_pki(folder / "pki", PKI_LAYOUT, PASSWORD))
    cluster = Cluster(free_port())
    cluster.start()
    setups = {}
    try:
        for engine in ("sqlite", "postgresql"):
            setups[engine] = Setup(folder / engine, pki, engine, cluster)
        figures = {(engine, fronts, name): [] for engine in setups for fronts in (1, 2) for name, *_ in CALLS}
        with multiprocessing.get_context("fork").Pool(CLIENTS) as pool:
            for _ in range(repetitions):
                for name, path, options in CALLS:
                    for engine, setup in setups.items():
                        for fronts in (1, 2):
                            figures[(engine, fronts, name)].append(
                                load(pool, pki, setup.bases[:fronts], path, seconds, options))
        print(f"{'call':<20} {'engine':<11} {'front ends':>10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}  failures")
        for (engine, fronts, name), runs in figures.items():
            rate, p50, p99 = (statistics.median(run[key] for run in runs) for key in ("rate", "p50", "p99"))
            failures = sum(run["failures"] for run in runs)
            print(f"{name:<20} {engine:<11} {fronts:>10} {rate:>8.0f} {p50:>7.1f} {p99:>7.1f}  {failures}",
                  flush=True)
    finally:
        for setup in setups.values():
            setup.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
