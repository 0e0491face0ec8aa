"""Ingestion speed against the same build with encryption at rest off, and against plain sqlite3 executemany.

Usage: .venv/bin/python bench/ingest.py [keys, default 400000] [repetitions, default 5]

Ours: `ingest_directories` of one key file into a fresh database (reading,
fingerprints, duplicate check, sealing, pool rows, counters, histogram,
events). "clear": the same with sealing turned off (bench/clear_store.py).
Two baselines with sqlite3's executemany alone, into the same schema with
the same pragmas, one transaction per batch of BATCH_KEYS keys as ingestion
does: "plain", pool rows as ingestion writes them (72-byte sealed
material); "plain+fp", those and the same fingerprint rows (every row
ingestion writes; the fingerprints and the material are made before the
clock starts). Prints keys per second, interleaved, and the ratios of the
medians.
"""
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.clear_store import keys_in_clear  # noqa: E402
from kme import create_app  # noqa: E402
from kme.config import load_config  # noqa: E402
from kme.operations.certs import generate_pki  # noqa: E402
from kme.operations.ingest import BATCH_KEYS, ingest_directories  # noqa: E402
from kme.storage.backends.sqlite import _PRAGMAS  # noqa: E402
from kme.storage.keystore.intake import fingerprints  # noqa: E402
from kme.storage.schema import ensure_schema  # noqa: E402
from kme.storage.sealing import OVERHEAD  # noqa: E402
from tests.support import Pki, write_config  # noqa: E402


def _config(folder: Path, pki: Pki) -> Path:
    """A KME configuration whose key-encryption key file is made here (no "generated" warning among the figures)."""
    folder.mkdir(parents=True, exist_ok=True)
    kek = folder / "bench.kek"
    kek.write_text(os.urandom(32).hex())
    kek.chmod(0o600)
    return write_config(folder, pki, log_level="WARNING", key_encryption_key=str(kek))


def ours(folder: Path, pki: Pki, data: bytes) -> float:
    config = _config(folder, pki)
    (folder / "keys" / "bench.cor").write_bytes(data)
    os.utime(folder / "keys" / "bench.cor", (time.time() - 60, time.time() - 60))
    app = create_app(load_config(config))
    with app.app_context():
        ensure_schema()
        started = time.perf_counter()
        summary = ingest_directories(app.extensions["kme"])
        seconds = time.perf_counter() - started
    assert summary.keys == len(data) // 32
    return summary.keys / seconds


def clear(folder: Path, pki: Pki, data: bytes) -> float:
    """Ours with encryption at rest off."""
    with keys_in_clear():
        return ours(folder, pki, data)


def plain(folder: Path, pki: Pki, data: bytes, with_fingerprints: bool = False) -> float:
    """The same rows with sqlite3 alone, into a schema made by the KME itself."""
    config = _config(folder, pki)
    app = create_app(load_config(config))
    keys = len(data) // 32
    with app.app_context():
        ensure_schema()
        prints = fingerprints([data[position * 32:(position + 1) * 32] for position in range(keys)]) \
            if with_fingerprints else []
    sealed = os.urandom((32 + OVERHEAD) * keys)
    connection = sqlite3.connect(folder / "kme.db", isolation_level=None)
    for pragma in _PRAGMAS:
        connection.execute(pragma)
    connection.execute("INSERT INTO key_files (id, link_id, name, next_position, complete, length, duplicates, "
                       "peer_position, decided, seq, changed_at) VALUES (1, 1, 'bench.cor', 0, 0, 0, 0, 0, 0, 0, 0)")
    started = time.perf_counter()
    for first in range(0, keys, BATCH_KEYS):
        last = min(first + BATCH_KEYS, keys)
        rows = [(1, 1, position, 0, sealed[position * (32 + OVERHEAD):(position + 1) * (32 + OVERHEAD)])
                for position in range(first, last)]
        connection.execute("BEGIN IMMEDIATE")
        if with_fingerprints:
            connection.executemany("INSERT OR IGNORE INTO key_fingerprints (fingerprint) VALUES (?)",
                                   [(fingerprint,) for fingerprint in sorted(prints[first:last])])
        connection.executemany(
            "INSERT INTO pool_keys (link_id, file_id, position, state, material) VALUES (?, ?, ?, ?, ?)", rows)
        connection.execute("COMMIT")
    seconds = time.perf_counter() - started
    connection.close()
    return keys / seconds


def plain_with_fingerprints(folder: Path, pki: Pki, data: bytes) -> float:
    """The pool rows and the fingerprint rows, with sqlite3 alone."""
    return plain(folder, pki, data, with_fingerprints=True)


def main() -> int:
    keys = int(sys.argv[1]) if len(sys.argv) > 1 else 400_000
    repetitions = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pki = Pki(tmp / "pki", generate_pki(tmp / "pki", {1: [1, 2]}, "password"))
        measures = {"ours": ours, "clear": clear, "plain": plain, "plain+fp": plain_with_fingerprints}
        runs = {name: [] for name in measures}
        for repetition in range(repetitions):
            data = os.urandom(32 * keys)
            for name, measure in measures.items():
                rate = measure(tmp / f"{name}{repetition}", pki, data)
                runs[name].append(rate)
                print(f"{name:>8} run {repetition + 1}: {rate:>9.0f} keys/s", flush=True)
        medians = {name: statistics.median(rates) for name, rates in runs.items()}
        print(f"median: ours {medians['ours']:.0f} keys/s; the same in clear {medians['clear']:.0f} keys/s, ratio "
              f"{medians['ours'] / medians['clear']:.2f}; plain sqlite3 executemany of the pool rows "
              f"{medians['plain']:.0f} keys/s, ratio {medians['ours'] / medians['plain']:.2f}; of the pool and "
              f"fingerprint rows {medians['plain+fp']:.0f} keys/s, ratio {medians['ours'] / medians['plain+fp']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
