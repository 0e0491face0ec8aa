"""The standalone ingestion worker: watchdog events on every key directory.

A file counts as complete when its writer closes it or when it is moved into
the directory; creation and modification events are ignored, so a file being
written is never ingested early. Linux only: the close-after-write event
comes from inotify.

It is also the KME's background worker: a second thread writes a heartbeat,
probes the peer KMEs, settles activations left pending at peers
(kme.activation), erases keys their slave SAEs did not fetch in time, and
truncates the WAL. Network calls there never delay ingestion.
"""
import logging
import queue
import threading
import time
from pathlib import Path

from flask import current_app
from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from kme import activation, sqlite
from kme.config import KmeConfig
from kme.db import db
from kme.ingest import IngestSummary, ingest_directories, ingest_file, link_of

log = logging.getLogger(__name__)

# How often the worker truncates the WAL, so that erased key bytes do not
# linger in the -wal file (see docs/design.md).
CHECKPOINT_SECONDS = 10.0
# How soon the worker notices that it was asked to stop.
STOP_POLL_SECONDS = 0.5


class _CompleteFiles(FileSystemEventHandler):
    """Queues the paths of files that have just become complete."""

    def __init__(self, paths: queue.Queue):
        self.paths = paths

    def on_closed(self, event: FileClosedEvent) -> None:
        self.paths.put(Path(event.src_path))

    def on_moved(self, event: FileMovedEvent) -> None:
        if not event.is_directory:
            self.paths.put(Path(event.dest_path))


def _keep_house(app, config: KmeConfig, stop: threading.Event) -> None:
    with app.app_context():
        last_checkpoint = time.monotonic()
        while True:
            try:
                activation.housekeeping(config)
                if time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                    sqlite.checkpoint(db.engine)
                    last_checkpoint = time.monotonic()
            except Exception:
                db.session.rollback()
                log.exception("housekeeping failed; trying again in the next interval")
            if stop.wait(config.this_kme.housekeeping_interval_seconds):
                return


def watch(config: KmeConfig, stop: threading.Event, on_ready=None) -> IngestSummary:
    """Ingest what is present, then every file that becomes complete, until ``stop`` is set."""
    paths: queue.Queue = queue.Queue()
    # Full events: a file moved in from an unwatched folder arrives as a move,
    # not as a creation (which would look like a file still being written).
    observer = InotifyObserver(generate_full_events=True)
    handler = _CompleteFiles(paths)
    for directory in config.key_directories().values():
        # Watch first, scan second: a file completed during the scan is then
        # seen twice, which ingestion makes harmless, rather than never.
        observer.schedule(handler, str(directory), recursive=False)
    observer.start()
    keeper = threading.Thread(target=_keep_house, args=(current_app._get_current_object(), config, stop),
                              name="housekeeping", daemon=True)
    keeper.start()
    try:
        summary = ingest_directories(config)
        if on_ready:
            on_ready(summary)
        while not stop.is_set():
            try:
                path = paths.get(timeout=STOP_POLL_SECONDS)
            except queue.Empty:
                continue
            link_id = link_of(config, path)
            if link_id is not None:
                ingest_file(config, link_id, path, summary)
    finally:
        stop.set()
        observer.stop()
        observer.join()
        keeper.join()
    return summary
