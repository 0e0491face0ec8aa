"""Garbage collection of the long-running processes (web workers, the ingestion worker), tuned once at start.

Their requests and batches allocate many short-lived objects and almost no
reference cycles, and every collection pauses all threads of the process:
the youngest generation is collected every 20 000 net allocations instead
of 700, and the objects alive once the app is loaded (modules, the app, its
configuration) are left out of every later collection. Measured in
docs/performance.md.
"""
import gc

THRESHOLDS = (20_000, 20, 20)


def tune() -> None:
    """Freeze the objects alive now out of later collections, and collect less often."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
