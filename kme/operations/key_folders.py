"""Key folders as the ingestion sees them: the mark that binds a folder to its database, and open writers.

A lost or replaced database would otherwise ingest every key file still in
the folders again and hand out keys that were already used. The mark
(``.kme-database`` in each key folder) names the database that ingests the
folder; a database with another ID leaves the folder alone until the
operator decides with ``flask adopt-key-folders``.
"""
import os
from pathlib import Path

from kme.storage import handout_mark

MARK_NAME = ".kme-database"
_MARK_STAGING = ".kme-database.new"
# Flags in /proc/<pid>/fdinfo are octal; O_WRONLY = 1, O_RDWR = 2.
_ACCESS_MODE = 0o3


def is_mark(name: str) -> bool:
    """Whether a folder entry is the mark (or its staging copy) or the hand-out mark's folder, not a key file."""
    return name in (MARK_NAME, _MARK_STAGING, handout_mark.MARK_NAME)


def read_mark(directory: Path) -> str | None:
    """The database ID the folder is bound to, or None if it carries no mark."""
    try:
        return (directory / MARK_NAME).read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable mark ({exc.__class__.__name__})"


def write_mark(directory: Path, database_id: str) -> None:
    """Bind the folder to ``database_id`` (written aside, then renamed: never half a mark)."""
    staging = directory / _MARK_STAGING
    staging.write_text(database_id + "\n", encoding="ascii")
    os.replace(staging, directory / MARK_NAME)


def claim(directory: Path, database_id: str) -> str | None:
    """Bind an unmarked folder to this database; why the folder must not be ingested, or None.

    A folder the KME cannot write to stays unmarked and is ingested anyway:
    the mark is a safeguard, not a requirement.
    """
    mark = read_mark(directory)
    if mark is None:
        try:
            write_mark(directory, database_id)
        except OSError:
            pass
        return None
    if mark != database_id:
        return (f"key folder {directory} was ingested by another database ({mark}); its files are not "
                "ingested until an operator runs `flask adopt-key-folders`")
    return None


def open_for_writing(directories) -> tuple[set[str], bool]:
    """Paths inside ``directories`` that some process has open for writing, and whether the answer is complete.

    Linux /proc: the open files of other users' processes are hidden from an
    unprivileged KME; then the answer is incomplete and the caller also waits
    for a file's modification time to settle.
    """
    prefixes = tuple(f"{directory}{os.sep}" for directory in directories)
    found, complete = set(), True
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return found, False
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            complete = False
            continue
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if not target.startswith(prefixes):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
            except (OSError, StopIteration, ValueError):
                continue
            if flags & _ACCESS_MODE:
                found.add(target)
    return found, complete
