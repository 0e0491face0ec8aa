"""Garbage collection of the web workers, tuned once the app is loaded.

Requests allocate many short-lived objects and almost no reference cycles,
and every collection pauses all threads of the worker: the youngest
generation is collected every 20 000 net allocations instead of 700, and
the objects alive once the app is loaded (modules, the app, its
configuration) are left out of every later collection. Measured in
docs/performance.md.

Not in the ingestion worker: its recovery from a database opened read-only
relies on the collector to close the connections it dropped (each sqlite3
connection is in a reference cycle with its statement cache, so only the
collector frees one that was not closed); with collections this rare it
did not recover within the 30 s of tests/test_storage_faults.py.
"""
import gc

THRESHOLDS = (20_000, 20, 20)


def tune() -> None:
    """Freeze the objects alive now out of later collections, and collect less often."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
