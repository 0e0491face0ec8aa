"""The same build with encryption at rest turned off, for the benchmarks only (never a product setting).

``turn_off()`` replaces the sealing functions of kme.storage.at_rest by the
identity (``keys_in_clear()`` while a block lasts): keys are stored and read
in clear, everything else is the product's code. bench/clear_app.py serves
the SAE app with sealing off for good; ``python bench/clear_store.py``
ingests the configured key folders once, in clear, as ``flask ingest-keys``
would.
"""
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kme.storage import at_rest  # noqa: E402

_IDENTITY = {
    "seal_pool": lambda link_id, file_name, positions, materials: list(materials),
    "open_pool": lambda target, link_id, rows, names=None: [stored for _file_id, _position, stored in rows],
    "seal_delivered": lambda link_id, master_sae_id, slave_ids, keys: [key.material for key in keys],
    "open_delivered": lambda key_id, link_id, master_sae_id, slave_ids, stored: stored,
    "seal_histogram": lambda link_id, histogram, sealer=None: histogram,
}


def turn_off() -> dict:
    """Sealing off in this process; the functions it replaced."""
    saved = {name: getattr(at_rest, name) for name in _IDENTITY}
    for name, replacement in _IDENTITY.items():
        setattr(at_rest, name, replacement)
    return saved


@contextmanager
def keys_in_clear():
    """Sealing off in this process until the block ends."""
    saved = turn_off()
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(at_rest, name, original)


def main() -> int:
    from kme import create_app
    from kme.operations.ingest import ingest_directories
    from kme.storage.schema import ensure_schema

    app = create_app(interface="cli")
    with keys_in_clear(), app.app_context():
        ensure_schema()
        print(ingest_directories(app.extensions["kme"]).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
