"""Soak: a KME pair under load for many rounds of injected faults, each round ending with the accounting check.

Usage: .venv/bin/python bench/soak.py [rounds, default 5] [faults per round, default 8]

Each round starts a fresh pair (two KMEs on 127.0.0.1 with a link file and a
zone file each), loads it from 6 client threads while SAE workers, inter-KME
interfaces and ingestion workers are killed and restarted, then runs the
byte-level accounting check of tests/faults.py. Prints one line per round
and the totals.
"""
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kme.operations.certs import generate_pki  # noqa: E402
from tests import faults  # noqa: E402
from tests.conftest import PKI_LAYOUT  # noqa: E402
from tests.support import PASSWORD, Pki  # noqa: E402


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    per_round = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    totals = faults.Figures()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kme-soak-") as folder:
        base = Path(folder)
        pki = Pki(base / "pki", generate_pki(base / "pki", PKI_LAYOUT, PASSWORD))
        for number in range(rounds):
            network, files = faults.started_pair(base / f"round{number}", pki, keys_per_file=4000)
            try:
                figures = faults.run(network, files, requests_per_thread=60, threads=6, faults=per_round,
                                     seed=number + 1)
            finally:
                network.stop_all()
            print(f"round {number + 1}: {figures.line()}", flush=True)
            for name in ("requests", "answered", "refused", "failed", "faults", "keys", "fetched"):
                setattr(totals, name, getattr(totals, name) + getattr(figures, name))
    print(f"total over {rounds} rounds in {time.monotonic() - started:.0f} s: {totals.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
