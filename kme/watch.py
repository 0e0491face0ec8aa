"""The standalone ingestion worker: watchdog events on every key directory.

It is also the KME's background worker: every housekeeping interval it
settles activations left pending at peer KMEs (kme.activation) and erases
keys their slave SAEs did not fetch in time.

A file counts as complete when its writer closes it or when it is moved into
the directory; creation and modification events are ignored, so a file being
written is never ingested early. Events are handled one at a time by the
calling thread, the only database writer of this process. Linux only: the
close-after-write event comes from inotify.
"""
import logging
import queue
import threading
import time
from pathlib import Path

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
    try:
        summary = ingest_directories(config)
        if on_ready:
            on_ready(summary)
        last_checkpoint = last_housekeeping = 0.0
        while not stop.is_set():
            if time.monotonic() - last_housekeeping >= config.this_kme.housekeeping_interval_seconds:
                activation.housekeeping(config)
                last_housekeeping = time.monotonic()
            if time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                sqlite.checkpoint(db.engine)
                last_checkpoint = time.monotonic()
            try:
                path = paths.get(timeout=STOP_POLL_SECONDS)
            except queue.Empty:
                continue
            link_id = link_of(config, path)
            if link_id is not None:
                ingest_file(config, link_id, path, summary)
    finally:
        observer.stop()
        observer.join()
    return summary
