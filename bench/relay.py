"""What a relay through two trusted nodes costs against a direct activation, and whether a node's cost grows with
its pools.

Usage: .venv/bin/python bench/relay.py [largest pool per link, default 200000]

Runs a line of real KMEs 1–2–3–4 on 127.0.0.1 (gunicorn, mutual TLS, the
ingestion workers, static routes) and goes through the SAE interface only:

- latency: the median and 99th percentile of enc_keys (one key) from SAE 1 at
  KME 1, for SAE 3 at KME 2 (direct: one activation) and for SAE 6 at KME 4
  (relayed by KMEs 2 and 3), one keep-alive client;
- throughput: the same calls from 4 client threads at once, requests per
  second;
- scale: the relayed call's median with 2 000 and with the largest pool on
  every link (every lookup of a node is an index search).

Every process shares the machine's cores: the relay runs four KMEs where the
direct call runs two. Prints the figures and the ratios.
"""
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kme.config import DEFAULT_HOUSEKEEPING_SECONDS  # noqa: E402
from kme.operations.certs import generate_pki  # noqa: E402
from tests.conftest import PKI_LAYOUT  # noqa: E402
from tests.network import Network, line_routes  # noqa: E402
from tests.support import PASSWORD, Pki  # noqa: E402

LINKS = [(1, 2), (2, 3), (3, 4)]
LATENCY_CALLS = 300
THROUGHPUT_CALLS = 400
CLIENTS = 4
SCALE_CALLS = 200
# Slave SAE of each case: SAE 3 behind KME 2, SAE 6 behind KME 4.
SLAVES = {"direct": 3, "relayed": 6}


def started(folder: Path, pki: Pki, keys: int) -> Network:
    network = Network(folder, pki, LINKS, routes=line_routes([1, 2, 3, 4]), log_level="WARNING",
                      housekeeping_interval_seconds=DEFAULT_HOUSEKEEPING_SECONDS)
    try:
        for a, b in LINKS:
            network.write_link_file(a, b, f"link-{a}-{b}.cor", keys)
        network.start_all()
        for a, b in LINKS:
            network.wait_for_link(a, b, keys, timeout=600)
    except BaseException:
        network.stop_all()
        raise
    return network


def _call(session, url: str) -> float:
    started_at = time.perf_counter()
    answer = session.get(url, timeout=30)
    if answer.status_code != 200:
        raise RuntimeError(answer.text)
    return time.perf_counter() - started_at


def latencies(network: Network, slave: int, calls: int) -> tuple[float, float]:
    """p50 and p99 of enc_keys of one key for ``slave``, in milliseconds."""
    url = f"{network[1].url()}/keys/{slave}/enc_keys"
    with network[1].sae(1) as session:
        for _ in range(20):
            _call(session, url)
        seconds = sorted(_call(session, url) for _ in range(calls))
    return statistics.median(seconds) * 1e3, seconds[int(len(seconds) * 0.99)] * 1e3


def throughput(network: Network, slave: int) -> float:
    """Requests per second of enc_keys for ``slave`` from CLIENTS keep-alive clients at once."""
    url = f"{network[1].url()}/keys/{slave}/enc_keys"
    failures = []

    def client() -> None:
        with network[1].sae(1) as session:
            try:
                for _ in range(THROUGHPUT_CALLS // CLIENTS):
                    _call(session, url)
            except RuntimeError as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    started_at = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(failures[0])
    return THROUGHPUT_CALLS / (time.perf_counter() - started_at)


def main() -> int:
    largest = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pki = Pki(tmp / "pki", generate_pki(tmp / "pki", PKI_LAYOUT, PASSWORD))
        network = started(tmp / "line", pki, 10_000)
        try:
            figures = {case: (*latencies(network, slave, LATENCY_CALLS), throughput(network, slave))
                       for case, slave in SLAVES.items()}
        finally:
            network.stop_all()
        for case, (p50, p99, rate) in figures.items():
            print(f"enc_keys, {case:>7} (slave SAE {SLAVES[case]}): p50 {p50:6.1f} ms, p99 {p99:6.1f} ms, "
                  f"{rate:6.0f} req/s with {CLIENTS} clients", flush=True)
        (direct_p50, _, direct_rate), (relay_p50, _, relay_rate) = figures["direct"], figures["relayed"]
        print(f"relay through two trusted nodes / direct: latency x{relay_p50 / direct_p50:.2f}, "
              f"throughput x{direct_rate / relay_rate:.2f} lower (limit 3)", flush=True)
        scale = {}
        for pool in (2_000, largest):
            network = started(tmp / f"scale-{pool}", pki, pool)
            try:
                scale[pool] = latencies(network, SLAVES["relayed"], SCALE_CALLS)
            finally:
                network.stop_all()
            print(f"relayed enc_keys, {pool:>8} keys on every link: p50 {scale[pool][0]:6.1f} ms, "
                  f"p99 {scale[pool][1]:6.1f} ms", flush=True)
        print(f"relay at {largest} / at 2000 keys per link: x{scale[largest][0] / scale[2_000][0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
