"""Cost of Get status, Get key and the entropy against the pool size.

Usage: .venv/bin/python bench/pool_scale.py [largest pool, default 1000000]

For pools of 10^3 up to the given size, ingests the keys into a fresh SQLite
file and times each SAE operation through the Flask app (no network, so the
figures show the database work). Prints microseconds per call; the point is
that each column stays flat as the pool grows.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kme import create_app  # noqa: E402
from kme.config import load_config  # noqa: E402
from kme.operations.certs import generate_pki  # noqa: E402
from kme.operations.ingest import ingest_directories  # noqa: E402
from kme.storage.schema import ensure_schema  # noqa: E402
from tests.conftest import client_with, sae_environ  # noqa: E402
from tests.support import Pki, write_config  # noqa: E402

CALLS = 200


def per_call_us(action) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        action()
    return (time.perf_counter() - start) / CALLS * 1e6


def measure(folder: Path, pki: Pki, pool: int) -> tuple[float, float, float, float]:
    config = write_config(folder, pki, log_level="WARNING")
    with open(folder / "keys" / "pool.cor", "wb") as handle:
        for _ in range(pool // 4096):
            handle.write(os.urandom(32 * 4096))
        handle.write(os.urandom(32 * (pool % 4096)))
    app = create_app(load_config(config))
    started = time.perf_counter()
    with app.app_context():
        ensure_schema()
        ingest_directories(app.extensions["kme"])
    ingest_seconds = time.perf_counter() - started
    client = client_with(app, sae_environ(pki, "sae1"))
    status = per_call_us(lambda: client.get("/api/v1/keys/2/status"))
    claim = per_call_us(lambda: client.get("/api/v1/keys/2/enc_keys"))
    entropy = per_call_us(lambda: client.get("/api/v1/keys/entropy/total"))
    return ingest_seconds, status, claim, entropy


def main() -> None:
    largest = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pki = Pki(tmp / "pki", generate_pki(tmp / "pki", {1: [1, 2]}, "password"))
        print(f"{'pool keys':>10} {'ingest s':>9} {'keys/s':>9} {'status us':>10} {'enc_keys us':>12} {'entropy us':>11}")
        pool = 1000
        while pool <= largest:
            ingest, status, claim, entropy = measure(tmp / f"pool{pool}", pki, pool)
            print(f"{pool:>10} {ingest:>9.2f} {pool / ingest:>9.0f} {status:>10.0f} {claim:>12.0f} {entropy:>11.0f}",
                  flush=True)
            pool *= 10


if __name__ == "__main__":
    main()
