"""enc_keys and dec_keys on SQLite and on PostgreSQL, through one and through two front ends, in one run.

Usage: .venv/bin/python bench/engines.py [seconds per measurement, default 3] [repetitions, default 3]

For each engine a KME (alone, its zone's pool filled with 300 000 keys) on
127.0.0.1: its ingestion worker and one SAE interface (2 workers x 8
threads, the product's defaults), then a second SAE interface of the same
configuration on another port, as a second host would run it. PostgreSQL is
a throwaway cluster of this run (tests/postgres.py, fsync on, the server's
defaults otherwise). The 8 client processes of bench/load.py (raw
keep-alive TLS sockets) load one front end, or 4 each on two; the four
set-ups are measured interleaved, each repetition in turn, and the table
gives medians of requests/s, p50 and p99, and the CPU time the front ends'
workers, PostgreSQL's server processes ("db") and the clients spent per
request; then PostgreSQL's throughput as
a share of SQLite's, one front end each.
Both front ends share this machine's 2 cores with the clients and the
database: the second one shows what the coordination between front ends
costs, not the capacity another host would add.
"""
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
    children,
    free_port,
    sae_port,
    sae_session,
    start_ingest_worker,
    start_sae_interface,
    wait_until,
    write_config,
    write_keys,
)
from load import CLIENTS, load, pool  # noqa: E402

KEYS = 300_000
CALLS = [("enc_keys, number=1", "/api/v1/keys/2/enc_keys", {}),
         ("dec_keys", "/api/v1/keys/1/dec_keys", {"sae": 2, "dec_keys": 1280})]


class Setup:
    """One KME on one engine, with its second front end started or not."""

    def __init__(self, folder: Path, pki: Pki, engine: str, cluster: Cluster | None):
        extra = {"db_uri": cluster.new_database()} if engine == "postgresql" else {}
        self.engine, self.cluster = engine, cluster if engine == "postgresql" else None
        self.config = write_config(folder, pki, **extra)
        write_keys(folder / "keys" / "pool.cor", KEYS)
        self.processes = [start_ingest_worker(self.config, folder / "ingest.log")]
        self.processes.append(start_sae_interface(self.config, folder / "sae.log", threads=8))
        self.second_port = free_port()
        self.processes.append(start_sae_interface(self.config, folder / "sae-b.log", threads=8,
                                                  port=self.second_port))
        self.bases = [f"https://127.0.0.1:{sae_port(self.config)}", f"https://127.0.0.1:{self.second_port}"]
        self.fronts = self.processes[1:]
        status = sae_session(pki, 1, 1)
        wait_until(lambda: status.get(f"{self.bases[0]}/api/v1/keys/2/status", timeout=10).json()[
            "stored_key_count"] == KEYS, timeout=300)
        status.close()

    def workers(self, fronts: int) -> list[int]:
        """The pids of the worker processes of the first ``fronts`` front ends (the servers' CPU time)."""
        return [pid for front in self.fronts[:fronts] for pid in children(front.proc.pid)]

    def database_processes(self) -> list[int]:
        """PostgreSQL's server processes (its postmaster's children: a backend per pooled connection, the WAL
        writer...); none for SQLite, which runs in the front ends' workers."""
        if self.cluster is None:
            return []
        postmaster = int((self.cluster.folder / "data" / "postmaster.pid").read_text().split()[0])
        return children(postmaster)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def _load(clients, setup: Setup, pki: Pki, fronts: int, path: str, seconds: float, options: dict) -> dict:
    """CLIENTS clients spread over ``fronts`` front ends of ``setup`` (bench/load.py)."""
    jobs = [{"pki": str(pki.folder), "base": setup.bases[index % fronts], "path": path, "seconds": seconds,
             "sae": options.get("sae", 1), **options} for index in range(CLIENTS)]
    return load(clients, jobs, setup.workers(fronts), setup.database_processes())


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
        with pool() as clients:
            for _ in range(repetitions):
                for name, path, options in CALLS:
                    for engine, setup in setups.items():
                        for fronts in (1, 2):
                            figures[(engine, fronts, name)].append(
                                _load(clients, setup, pki, fronts, path, seconds, options))
        print(f"{'call':<20} {'engine':<11} {'front ends':>10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'cpu ms':>6} {'db':>6} {'client':>6}  failures")
        rates = {}
        for (engine, fronts, name), runs in figures.items():
            rate, p50, p99, cpu, database_cpu, client_cpu = (
                statistics.median(run[key] for run in runs)
                for key in ("rate", "p50", "p99", "cpu", "database_cpu", "client_cpu"))
            rates[(engine, fronts, name)] = rate
            failures = sum(run["failures"] for run in runs)
            print(f"{name:<20} {engine:<11} {fronts:>10} {rate:>8.0f} {p50:>7.1f} {p99:>7.1f} {cpu:>6.3f} "
                  f"{database_cpu:>6.3f} {client_cpu:>6.3f}  {failures}", flush=True)
        for name, *_ in CALLS:
            print(f"PostgreSQL / SQLite, {name}, one front end: "
                  f"{rates[('postgresql', 1, name)] / rates[('sqlite', 1, name)]:.2f}", flush=True)
    finally:
        for setup in setups.values():
            setup.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
