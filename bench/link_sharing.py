"""How much of a link's keys each direction gets, and what a remote key costs as the link's pool grows.

Usage: .venv/bin/python bench/link_sharing.py [largest pool, default 1000000]

Runs real KME pairs on 127.0.0.1 (gunicorn, mutual TLS, the ingestion
workers) and goes through the SAE interface only, as an application would:

- drain: one master alone (at KME 2, which borrows every key from KME 1's
  direction) asks for 8 keys at a time on a four-file link until refused;
- lopsided: masters at both KMEs ask for 4 keys at a time, 3:1, 10:1 and
  1:1, until the first refusal;
- scale: the median and 99th percentile latency of a remote enc_keys (one
  key, the slave behind the other KME) with 10^3 and with the largest pool
  on the link, one client, keep-alive.

Prints the share of the link's keys handed out before the first refusal and
the latencies.
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kme.operations.certs import generate_pki  # noqa: E402
from tests.conftest import PKI_LAYOUT  # noqa: E402
from tests.network import Network  # noqa: E402
from tests.support import PASSWORD, Pki  # noqa: E402

MASTER_OF = {1: (1, 3), 2: (3, 1)}
SCALE_CALLS = 400


def started(folder: Path, pki: Pki, files: dict[str, int]) -> Network:
    network = Network(folder, pki, [(1, 2)], log_level="WARNING")
    for name, keys in files.items():
        network.write_link_file(1, 2, name, keys)
    network.start_all()
    network.wait_for_link(1, 2, sum(files.values()), timeout=600)
    return network


def take(network: Network, sessions: dict, side: int, number: int):
    kme = network[side]
    master, slave = MASTER_OF[side]
    return sessions[side].post(f"{kme.url()}/keys/{slave}/enc_keys", json={"number": number}, timeout=30)


def share_before_refusal(network: Network, turns: list[int], number: int, total: int) -> float:
    """Keys handed out, as a share of the link's, when the first request is refused."""
    sessions = {side: network[side].sae(MASTER_OF[side][0]) for side in (1, 2)}
    served = 0
    while (answer := take(network, sessions, turns[served % len(turns)], number)).status_code == 200:
        served += 1
    for session in sessions.values():
        session.close()
    if not answer.json()["message"].startswith("not enough key material"):
        raise RuntimeError(f"refused for another reason: {answer.text}")
    return served * number / total


def remote_latencies(network: Network) -> tuple[float, float]:
    """p50 and p99 of a remote enc_keys of one key, in milliseconds."""
    session = network[1].sae(1)
    url = f"{network[1].url()}/keys/3/enc_keys"
    for _ in range(20):
        session.get(url, timeout=30)
    seconds = []
    for _ in range(SCALE_CALLS):
        started_at = time.perf_counter()
        answer = session.get(url, timeout=30)
        seconds.append(time.perf_counter() - started_at)
        if answer.status_code != 200:
            raise RuntimeError(answer.text)
    session.close()
    seconds.sort()
    return statistics.median(seconds) * 1e3, seconds[int(len(seconds) * 0.99)] * 1e3


def main() -> int:
    largest = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pki = Pki(tmp / "pki", generate_pki(tmp / "pki", PKI_LAYOUT, PASSWORD))
        files = {f"drain-{index}.cor": 1000 for index in range(4)}
        network = started(tmp / "drain", pki, files)
        try:
            share = share_before_refusal(network, [2], 8, 4000)
        finally:
            network.stop_all()
        print(f"drain, one master alone at KME 2, 4 files of 1000 keys: {share:.2%} of the link's keys", flush=True)
        for name, turns in (("3:1", [1, 1, 1, 2]), ("10:1", [1] * 10 + [2]), ("1:1", [1, 2])):
            network = started(tmp / f"lopsided-{name.replace(':', '-')}", pki, {"link.cor": 4000})
            try:
                share = share_before_refusal(network, turns, 4, 4000)
            finally:
                network.stop_all()
            print(f"lopsided {name:>4} (KME 1 : KME 2), 4000 keys: {share:.2%} used before the first refusal",
                  flush=True)
        for pool in (1000, largest):
            network = started(tmp / f"scale-{pool}", pki, {"pool.cor": pool})
            try:
                p50, p99 = remote_latencies(network)
            finally:
                network.stop_all()
            print(f"remote enc_keys, {pool:>9} link keys: p50 {p50:6.1f} ms, p99 {p99:6.1f} ms "
                  f"({SCALE_CALLS} calls, one keep-alive client)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
