"""Cost of the activation path's database work against the size of the link's pool.

Usage: .venv/bin/python bench/activation_scale.py [largest pool, default 1000000]

For pools of 10^3 up to the given size on the link between KMEs 1 and 2,
ingests one key file into a fresh SQLite file of KME 1 and times, in
process (no network, so the figures show the database work): a peer's
activation of one 256-bit key (what KME 1 does when KME 2 asks), and
KME 1's own reserve and finalize of one key for a slave behind KME 2.
Prints microseconds per call; the point is that each column stays flat.
"""
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kme import create_app  # noqa: E402
from kme.config import load_config  # noqa: E402
from kme.operations.certs import generate_pki  # noqa: E402
from kme.operations.ingest import ingest_directories  # noqa: E402
from kme.storage.keystore import incoming, leases, outgoing  # noqa: E402
from kme.storage.keystore.incoming import ActivationRequest  # noqa: E402
from kme.storage.schema import ensure_schema  # noqa: E402
from tests.conftest import PKI_LAYOUT  # noqa: E402
from tests.network import Network  # noqa: E402
from tests.support import PASSWORD, Pki, confirm_link  # noqa: E402

CALLS = 200


def measure(folder: Path, pki: Pki, pool: int) -> tuple[float, float]:
    network = Network(folder, pki, [(1, 2)], log_level="WARNING")
    network.write_link_file(1, 2, "pool.cor", pool)
    app = create_app(load_config(network[1].config))
    with app.app_context():
        ensure_schema()
        ingest_directories(app.extensions["kme"])
        confirm_link(1, 2)
        # KME 1 arbitrates the link: KME 2's direction activates the keys KME 1 lent it.
        runs, _ = leases.give(2, leases.LeaseRequest(str(uuid.uuid4()), CALLS, CALLS))
        positions = iter([run["first"] + offset for run in runs for offset in range(run["count"])])
        started = time.perf_counter()
        for _ in range(CALLS):
            incoming.activate(1, 2, ActivationRequest(str(uuid.uuid4()), 3, [1], 256,
                                                      [(str(uuid.uuid4()), [("pool.cor", next(positions))])]))
        peer = (time.perf_counter() - started) / CALLS * 1e6
        started = time.perf_counter()
        for _ in range(CALLS):
            outgoing.finalize(outgoing.reserve(2, 1, [3], [], 1, 256))
        own = (time.perf_counter() - started) / CALLS * 1e6
    return peer, own


def main() -> int:
    largest = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pki = Pki(tmp / "pki", generate_pki(tmp / "pki", PKI_LAYOUT, PASSWORD))
        print(f"{'pool keys':>10} {'peer activation us':>19} {'reserve+finalize us':>20}")
        pool = 1000
        while pool <= largest:
            peer, own = measure(tmp / f"pool{pool}", pki, pool)
            print(f"{pool:>10} {peer:>19.0f} {own:>20.0f}", flush=True)
            pool *= 10
    return 0


if __name__ == "__main__":
    sys.exit(main())
