"""Ingestion of key files (.cor) into the pools of the links.

A file is read in batches straight from disk (never whole into memory) and
each batch is committed together with the file's position, so ingestion can
stop at any point and resume, and ingesting a file again adds nothing. A
file that grows after it was ingested is read on from where it stopped.
Folder scans leave alone files that are still being written, and folders
that belong to another database (kme.operations.key_folders).
"""
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from kme.config import KmeConfig
from kme.errors import IngestionHalted
from kme.operations import key_folders
from kme.storage.db import meta
from kme.storage.keystore import intake
from kme.storage.keystore.common import KEY_BYTES
from kme.storage.meta_names import DATABASE_ID
from kme.text import printable

log = logging.getLogger(__name__)

KEY_FILE_SUFFIX = ".cor"
BATCH_KEYS = 65536
# A progress bar is worth showing on a terminal from this backlog on.
PROGRESS_BAR_BYTES = 64 * 2**20


@dataclass
class IngestSummary:
    """What one ingestion run did; ``known`` holds warnings already logged (by earlier scans of a worker)."""

    files: int = 0
    keys: int = 0
    skipped: int = 0
    duplicates: int = 0
    deferred: int = 0
    warnings: list[str] = field(default_factory=list)
    known: set[str] = field(default_factory=set)

    def warn(self, message: str, skipped: bool = True) -> None:
        message = printable(message)
        if message not in self.known:
            log.warning("%s", message)
            self.known.add(message)
        self.warnings.append(message)
        self.skipped += skipped

    def line(self) -> str:
        line = f"ingested {self.files} files, {self.keys} keys; skipped {self.skipped}; {len(self.warnings)} warnings"
        if self.duplicates:
            line += f"; refused {self.duplicates} keys ingested before"
        if self.deferred:
            line += f"; {self.deferred} files still being written, left for later"
        return line


def link_of(config: KmeConfig, path: Path) -> int | None:
    """The link whose key directory directly holds ``path``, if any."""
    parent = Path(os.path.abspath(path)).parent
    for link_id, directory in config.key_directories().items():
        if parent == directory:
            return link_id
    return None


def ingest_directories(config: KmeConfig, summary: IngestSummary | None = None,
                       show_progress: bool = False) -> IngestSummary:
    """Ingest every complete file present in the key directory of every link, in name order.

    Files already complete are passed over with one query per link, so a
    rescan of a folder of many old files costs next to nothing. Files still
    open for writing, or modified within the settle time, wait for their
    close event or the next scan.
    """
    summary = summary or IngestSummary()
    pending = []
    for link_id, directory in config.key_directories().items():
        refused = key_folders.claim(directory, config.this_kme.id, meta(DATABASE_ID).decode())
        if refused:
            summary.warn(refused)
            continue
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as exc:
            summary.warn(f"key directory {directory} of link {link_id} cannot be read: {exc.strerror}")
            continue
        done = intake.complete_files(link_id)
        for entry in entries:
            if key_folders.is_mark(entry.name):
                continue
            length = done.get(entry.name)
            if length is not None and _size(Path(entry.path)) <= length:
                summary.skipped += 1
            else:
                pending.append((link_id, Path(entry.path)))
    pending = _settled(config, pending, summary)
    backlog = sum(_size(path) for _, path in pending)
    if show_progress and backlog >= PROGRESS_BAR_BYTES:
        with click.progressbar(length=backlog, label="Ingesting key files") as bar:
            for link_id, path in pending:
                ingest_file(config, link_id, path, summary, progress=bar.update)
    else:
        for link_id, path in pending:
            ingest_file(config, link_id, path, summary)
    return summary


def _settled(config: KmeConfig, pending: list, summary: IngestSummary) -> list:
    """The pending files that no process has open for writing (or, without a full view, changed recently)."""
    if not pending:
        return pending
    writing, sure = key_folders.open_for_writing(config.key_directories().values())
    recent = time.time() - config.this_kme.key_file_settle_seconds
    settled = []
    for link_id, path in pending:
        # Without a full view of the open files, a file changed recently may still have a writer.
        if str(path) in writing or (not sure and _modified(path) > recent):
            summary.deferred += 1
            log.info("%s: still being written, ingested once complete", printable(str(path)))
        else:
            settled.append((link_id, path))
    return settled


def ingest_file(config: KmeConfig, link_id: int, path: Path, summary: IngestSummary,
                progress=None) -> None:
    """Ingest one complete key file into the pool of ``link_id``, or skip it with a warning.

    Storage failures propagate (the caller retries); problems of the file
    itself are warnings.
    """
    name = path.name
    if key_folders.is_mark(name):
        return
    shown = printable(str(path))
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # Peer KMEs name keys by file name on the wire, in UTF-8.
        summary.warn(f"{shown}: file name is not valid UTF-8, skipped (rename the file at both ends of the link)")
        return
    if not name.endswith(KEY_FILE_SUFFIX):
        summary.warn(f"{shown}: not a {KEY_FILE_SUFFIX} file, skipped")
        return
    refused = key_folders.claim(path.parent, config.this_kme.id, meta(DATABASE_ID).decode())
    if refused:
        summary.warn(refused)
        return
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        summary.warn(f"{shown}: cannot be read ({exc.strerror}), skipped")
        return
    # A symlink could point outside the key directory, or at another key file
    # whose keys would then be ingested twice under two names.
    if stat.S_ISLNK(mode):
        summary.warn(f"{shown}: symbolic link, skipped")
        return
    if not stat.S_ISREG(mode):
        summary.warn(f"{shown}: not a regular file, skipped")
        return
    try:
        handle = open(path, "rb")
    except OSError as exc:
        summary.warn(f"{shown}: cannot be read ({exc.strerror}), skipped")
        return
    with handle:
        file_progress = intake.open_key_file(link_id, name)
        size = os.fstat(handle.fileno()).st_size
        if file_progress.complete:
            if size <= file_progress.length:
                summary.skipped += 1
                return
            summary.warn(f"{shown}: grew from {file_progress.length} to {size} bytes after it was ingested; "
                         f"the new keys are ingested from position {file_progress.next_position} on", skipped=False)
        handle.seek(file_progress.next_position * KEY_BYTES)
        added = _read_batches(config, link_id, shown, handle, file_progress, summary, progress)
    if added is None:
        return
    summary.files += 1
    summary.keys += added
    if config.this_kme.delete_key_file_after_read:
        try:
            os.unlink(path)
        except OSError as exc:
            log.warning("%s: ingested but could not be deleted (%s)", shown, exc.strerror)


def _read_batches(config, link_id, shown, handle, file_progress, summary, progress) -> int | None:
    """Store the file's keys batch by batch; the number added, or None if stopped early."""
    added = 0
    while True:
        try:
            chunk = handle.read(BATCH_KEYS * KEY_BYTES)
        except OSError as exc:
            summary.warn(f"{shown}: read failed ({exc.strerror}); {added} keys kept, the rest on the next run")
            return None
        whole = len(chunk) - len(chunk) % KEY_BYTES
        at_end = len(chunk) < BATCH_KEYS * KEY_BYTES
        materials = [chunk[i:i + KEY_BYTES] for i in range(0, whole, KEY_BYTES)]
        try:
            file_progress, refused = intake.store_keys(
                config.this_kme.id, link_id, file_progress, materials, handle.tell(), at_end,
                config.this_kme.limits.max_key_count)
        except IngestionHalted as exc:
            summary.warn(f"{shown}: {exc}; {added} keys kept, the rest on a later run")
            return None
        if refused:
            summary.duplicates += refused
            summary.warn(f"{shown}: {refused} keys refused: the same key material was ingested before "
                         "(a renamed or copied file?)", skipped=False)
        added += len(materials) - refused
        if progress:
            progress(len(chunk))
        if at_end:
            if len(chunk) != whole:
                summary.warn(f"{shown}: {len(chunk) - whole} trailing bytes do not make a key, not used yet",
                             skipped=False)
            return added


def _modified(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0
