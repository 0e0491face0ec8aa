"""Ingestion of key files (.cor) into the pools of the links.

A file is read in batches straight from disk (never whole into memory) and
each batch is committed together with the file's position, so ingestion can
stop at any point and resume, and ingesting a file again adds nothing.
"""
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import click

from kme.config import KmeConfig
from kme.keystore import intake
from kme.keystore.common import KEY_BYTES

log = logging.getLogger(__name__)

KEY_FILE_SUFFIX = ".cor"
BATCH_KEYS = 4096
# A progress bar is worth showing on a terminal from this backlog on.
PROGRESS_BAR_BYTES = 64 * 2**20


@dataclass
class IngestSummary:
    """What one ingestion run did."""

    files: int = 0
    keys: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)
        self.skipped += 1

    def line(self) -> str:
        return (f"ingested {self.files} files, {self.keys} keys; "
                f"skipped {self.skipped}; {len(self.warnings)} warnings")


def link_of(config: KmeConfig, path: Path) -> int | None:
    """The link whose key directory directly holds ``path``, if any."""
    parent = Path(os.path.abspath(path)).parent
    for link_id, directory in config.key_directories().items():
        if parent == directory:
            return link_id
    return None


def ingest_directories(config: KmeConfig, summary: IngestSummary | None = None,
                       show_progress: bool = False) -> IngestSummary:
    """Ingest every file present in the key directory of every link, in name order.

    Files already complete are passed over with one query per link, so a
    restart over a folder of many old files costs next to nothing.
    """
    summary = summary or IngestSummary()
    pending = []
    for link_id, directory in config.key_directories().items():
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as exc:
            summary.warn(f"key directory {directory} of link {link_id} cannot be read: {exc.strerror}")
            continue
        done = intake.complete_files(link_id)
        summary.skipped += sum(1 for entry in entries if entry.name in done)
        pending.extend((link_id, Path(entry.path)) for entry in entries if entry.name not in done)
    backlog = sum(_size(path) for _, path in pending)
    if show_progress and backlog >= PROGRESS_BAR_BYTES:
        with click.progressbar(length=backlog, label="Ingesting key files") as bar:
            for link_id, path in pending:
                ingest_file(config, link_id, path, summary, progress=bar.update)
    else:
        for link_id, path in pending:
            ingest_file(config, link_id, path, summary)
    return summary


def ingest_file(config: KmeConfig, link_id: int, path: Path, summary: IngestSummary,
                progress=None) -> None:
    """Ingest one complete key file into the pool of ``link_id``, or skip it with a warning."""
    name = path.name
    if not name.endswith(KEY_FILE_SUFFIX):
        summary.warn(f"{path}: not a {KEY_FILE_SUFFIX} file, skipped")
        return
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        summary.warn(f"{path}: cannot be read ({exc.strerror}), skipped")
        return
    # A symlink could point outside the key directory, or at another key file
    # whose keys would then be ingested twice under two names.
    if stat.S_ISLNK(mode):
        summary.warn(f"{path}: symbolic link, skipped")
        return
    if not stat.S_ISREG(mode):
        summary.warn(f"{path}: not a regular file, skipped")
        return
    try:
        handle = open(path, "rb")
    except OSError as exc:
        summary.warn(f"{path}: cannot be read ({exc.strerror}), skipped")
        return
    with handle:
        file_progress = intake.open_key_file(link_id, name)
        if file_progress.complete:
            summary.skipped += 1
            return
        handle.seek(file_progress.next_position * KEY_BYTES)
        added = _read_batches(config, link_id, path, handle, file_progress, summary, progress)
    if added is None:
        return
    summary.files += 1
    summary.keys += added
    if config.this_kme.delete_key_file_after_read:
        try:
            os.unlink(path)
        except OSError as exc:
            log.warning("%s: ingested but could not be deleted (%s)", path, exc.strerror)


def _read_batches(config, link_id, path, handle, file_progress, summary, progress) -> int | None:
    """Store the file's keys batch by batch; the number added, or None if stopped early."""
    added = 0
    while True:
        try:
            chunk = handle.read(BATCH_KEYS * KEY_BYTES)
        except OSError as exc:
            summary.warn(f"{path}: read failed ({exc.strerror}); {added} keys kept, the rest on the next run")
            return None
        whole = len(chunk) - len(chunk) % KEY_BYTES
        at_end = len(chunk) < BATCH_KEYS * KEY_BYTES
        materials = [chunk[i:i + KEY_BYTES] for i in range(0, whole, KEY_BYTES)]
        try:
            file_progress = intake.store_keys(link_id, file_progress, materials, at_end,
                                              config.this_kme.limits.max_key_count,
                                              intake.peer_parity(config.this_kme.id, link_id))
        except ValueError as exc:
            summary.warn(f"{path}: {exc}; {added} keys kept, the rest on a later run")
            return None
        added += len(materials)
        if progress:
            progress(len(chunk))
        if at_end:
            if len(chunk) != whole:
                summary.warnings.append(f"{path}: {len(chunk) - whole} trailing bytes do not make a key, not used")
                log.warning("%s", summary.warnings[-1])
            return added


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0
