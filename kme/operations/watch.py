"""The standalone ingestion worker: watchdog events on every key directory, and the KME's periodic work.

A file counts as complete when its writer closes it or when it is moved into
the directory; creation and modification events are ignored, so a file being
written is never ingested early. Linux only: the close-after-write event
comes from inotify. A periodic rescan of every folder catches what events
missed (an inotify queue overflow, a fault that interrupted ingestion).

A second thread beats (the health checks read it), triggers the rescan, and
runs the KME's periodic work on its own database: expiry of keys their slave
SAEs did not fetch, relays whose worker died, WAL checkpoints. A third runs
the periodic work with the peers: probes, the progress exchange, settling of
activations left pending at peers (kme.domain.activation), releases; a peer
that hangs slows that thread only, never the heartbeat, so it never makes
the KME look dead. Several workers of one KME (one per host) each ingest and
beat; the periodic work runs in the one holding the database's periodic
lock (the backend's periodic_lock), and passes to another when it stops or
loses its connection. Network calls never delay ingestion. No thread dies of
its input or of its disk: failures are logged once, retried with backoff,
and shown by /healthz.
"""
import logging
import queue
import threading
import time
from pathlib import Path

from flask import current_app
from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from kme.config import KmeConfig
from kme.domain import periodic
from kme.operations import health
from kme.operations.ingest import IngestSummary, ingest_directories, ingest_file, link_of
from kme.storage.db import db, storage
from kme.storage.schema import ensure_schema

log = logging.getLogger(__name__)

# How often the worker truncates the WAL, so that erased key bytes do not
# linger in the -wal file (see docs/design.md).
CHECKPOINT_SECONDS = 10.0
# Seconds between two heartbeats, at least (/healthz allows three housekeeping intervals and 2 s).
BEAT_SECONDS = 1.0
# How soon the worker notices that it was asked to stop.
STOP_POLL_SECONDS = 0.5
# Retry delays after a failure: doubling from the first to the last.
BACKOFF_SECONDS = (0.5, 10.0)


class _CompleteFiles(FileSystemEventHandler):
    """Queues the paths of files that have just become complete."""

    def __init__(self, paths: queue.Queue):
        self.paths = paths

    def on_closed(self, event: FileClosedEvent) -> None:
        self.paths.put(Path(event.src_path))

    def on_moved(self, event: FileMovedEvent) -> None:
        if not event.is_directory:
            self.paths.put(Path(event.dest_path))


class Retry:
    """Runs a step until it succeeds, waiting longer after each failure; logs a fault once, and its end."""

    def __init__(self, what: str, stop: threading.Event):
        self.what, self.stop = what, stop
        self.delay = 0.0
        self.fault: str | None = None

    def run(self, step) -> bool:
        """One attempt of ``step()``; on failure, wait the backoff delay (or until stop) and return False."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the worker must outlive any failure of its input or disk
            db.session.rollback()
            fault = f"{exc.__class__.__name__}: {getattr(exc, 'orig', exc)}"
            if fault != self.fault:
                log.error("%s failed (%s); retrying with backoff", self.what, fault)
                self.fault = fault
            self.delay = min(max(self.delay * 2, BACKOFF_SECONDS[0]), BACKOFF_SECONDS[1])
            self.stop.wait(self.delay)
            return False
        if self.fault:
            log.warning("%s works again", self.what)
        self.fault, self.delay = None, 0.0
        return True


def _keep_house(app, config: KmeConfig, stop: threading.Event, rescan: threading.Event,
                leading: threading.Event) -> None:
    """The heartbeat and rescans of this worker, and the KME's periodic work on its database while this worker holds
    the periodic lock (``leading`` says so to the peers' thread)."""
    with app.app_context():
        retry = Retry("housekeeping", stop)
        due = {"checkpoint": time.monotonic(), "rescan": time.monotonic(), "beat": float("-inf")}
        backend = storage().backend
        lock = backend.periodic_lock()
        said = {"held": None}
        jobs = periodic.Schedule(periodic.DATABASE_JOBS)

        def step():
            # This thread starts before the first scan creates a new database's schema.
            ensure_schema()
            now = time.monotonic()
            if now - due["beat"] >= max(config.this_kme.housekeeping_interval_seconds, BEAT_SECONDS):
                health.beat()
                due["beat"] = now
            if now - due["rescan"] >= config.this_kme.rescan_interval_seconds:
                rescan.set()
                due["rescan"] = now
            held = lock.held()
            if held != said["held"]:
                log.info("this worker runs the KME's periodic work" if held else
                         "another worker of this KME runs its periodic work; this one ingests and beats only")
                said["held"] = held
            (leading.set if held else leading.clear)()
            if not held:
                return
            jobs.run_due(config)
            if now - due["checkpoint"] >= CHECKPOINT_SECONDS:
                backend.checkpoint()
                due["checkpoint"] = now

        try:
            while not stop.is_set():
                if retry.run(step):
                    stop.wait(config.this_kme.housekeeping_interval_seconds)
        finally:
            leading.clear()
            lock.release()


def _keep_in_touch(app, config: KmeConfig, stop: threading.Event, leading: threading.Event,
                   wake: threading.Event) -> None:
    """The KME's periodic work with its peers, while this worker leads; ``wake`` runs it early (keys were ingested:
    tell the peers)."""
    with app.app_context():
        retry = Retry("periodic work with the peers", stop)
        jobs = periodic.Schedule(periodic.PEER_JOBS)
        woken = False
        while not stop.is_set():
            now_too = (periodic.SHARING,) if woken else ()
            if not leading.is_set() or retry.run(lambda: jobs.run_due(config, now_too)):
                woken = wake.wait(config.this_kme.housekeeping_interval_seconds)
                wake.clear()


def watch(config: KmeConfig, stop: threading.Event, on_ready=None) -> IngestSummary:
    """Ingest what is present, then every file that becomes complete, until ``stop`` is set."""
    paths: queue.Queue = queue.Queue()
    rescan = threading.Event()
    wake = threading.Event()
    # Full events: a file moved in from an unwatched folder arrives as a move,
    # not as a creation (which would look like a file still being written).
    observer = InotifyObserver(generate_full_events=True)
    handler = _CompleteFiles(paths)
    for directory in config.key_directories().values():
        # Watch first, scan second: a file completed during the scan is then
        # seen twice, which ingestion makes harmless, rather than never.
        observer.schedule(handler, str(directory), recursive=False)
    observer.start()
    summary = IngestSummary()
    retry = Retry("ingestion", stop)

    def scan(into: IngestSummary) -> None:
        ensure_schema()
        ingest_directories(config, into)
        wake.set()

    def ingest(link_id: int, path: Path) -> None:
        ingest_file(config, link_id, path, summary)
        wake.set()

    app, leading = current_app._get_current_object(), threading.Event()
    keeper = threading.Thread(target=_keep_house, args=(app, config, stop, rescan, leading), name="housekeeping",
                              daemon=True)
    messenger = threading.Thread(target=_keep_in_touch, args=(app, config, stop, leading, wake), name="peers",
                                 daemon=True)
    keeper.start()
    messenger.start()
    try:
        if not retry.run(lambda: scan(summary)):
            # A database that cannot be used yet: the worker watches anyway and scans again.
            rescan.set()
        if on_ready:
            on_ready(summary)
        while not stop.is_set():
            if rescan.is_set():
                rescan.clear()
                # Warnings already logged stay quiet on later scans.
                later = IngestSummary(known=summary.known)
                if retry.run(lambda: scan(later)):
                    summary.files, summary.keys = summary.files + later.files, summary.keys + later.keys
                else:
                    rescan.set()
            try:
                path = paths.get(timeout=STOP_POLL_SECONDS)
            except queue.Empty:
                continue
            link_id = link_of(config, path)
            if link_id is not None and not retry.run(lambda: ingest(link_id, path)):
                # The next rescan picks the file up again, where it stopped.
                rescan.set()
    finally:
        stop.set()
        wake.set()
        observer.stop()
        observer.join()
        keeper.join()
        messenger.join()
    return summary
