"""The hand-out mark: how far the database had gone when keys last left this KME, kept outside the database.

A database restored from a backup, or a PostgreSQL standby promoted before
it received the last commits, has forgotten keys it already handed out: as
it stands it would hand them out again. Every link row counts its keys'
final fates (delivered + discarded + set aside), a sum that only grows; once
a transaction that hands keys out has committed, and before its answer
leaves, the KME records that sum in ``.kme-handed-out/mark`` in its own key
folder, beside the folder mark (kme.operations.key_folders). The record has
a folder of its own because it is read and written at every hand-out: in
the key folder itself, each access woke the ingestion worker's watch of it
(inotify watches one folder, not those below). A database
whose sum is below the mark went back in time: the KME refuses to hand out
keys from it until an operator runs ``flask restored-from-backup``.

The mark is read, then the database: the mark only ever holds a sum the
database committed, so on a database that never went back the sum read
after it can only be higher. The file is one fixed-size record updated in
place under an flock, so concurrent workers keep the highest value.
"""
import fcntl
import os
from pathlib import Path

# The mark's folder in the key folder, and its record there.
MARK_NAME = ".kme-handed-out"
_RECORD = "mark"
# "<database ID, 32 hex digits> <sum, 20 digits>\n"
_SIZE = 32 + 1 + 20 + 1


def path(folder: Path) -> Path:
    """The record of the mark of key folder ``folder``."""
    return folder / MARK_NAME / _RECORD


def read(folder: Path) -> tuple[str, int] | None:
    """(database ID, sum) of the mark in ``folder``, or None if there is none (or it is not one of ours)."""
    try:
        descriptor = os.open(path(folder), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH)
        return _parse(os.pread(descriptor, _SIZE, 0))
    finally:
        os.close(descriptor)


def advance(folder: Path, database_id: str, spent: int) -> None:
    """Raise the mark to ``spent`` for ``database_id``; a mark of another database is left as it is (that one, or
    a process that still knows this database by its former ID, must not lose it).

    OSError if the folder cannot be written: the caller decides whether keys may leave without a mark.
    """
    _write(folder, database_id, spent, lambda current: current is None or (current[0] == database_id
                                                                           and current[1] < spent))


def reset(folder: Path, database_id: str, spent: int) -> None:
    """Set the mark to ``spent`` for ``database_id``, whatever it held (an operator's command decided)."""
    _write(folder, database_id, spent, lambda current: True)


def _write(folder: Path, database_id: str, spent: int, wanted) -> None:
    try:
        descriptor = os.open(path(folder), os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        os.makedirs(folder / MARK_NAME, mode=0o700, exist_ok=True)
        descriptor = os.open(path(folder), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        if wanted(_parse(os.pread(descriptor, _SIZE, 0))):
            os.pwrite(descriptor, f"{database_id} {spent:020d}\n".encode("ascii"), 0)
            os.ftruncate(descriptor, _SIZE)
    finally:
        os.close(descriptor)


def problem(folder: Path, mark: tuple[str, int] | None, database_id: str, spent: int) -> str | None:
    """Why the database must not hand out keys, or None: it is behind ``mark`` (read from ``folder`` before
    ``spent`` was read from the database), or the mark is another database's."""
    if mark is None:
        return None
    if mark[0] != database_id:
        return (f"{path(folder)} names database {mark[0]}, not this one ({database_id}): a process that "
                "still runs since `flask restored-from-backup` must be restarted; a new database takes the folders "
                "over with `flask adopt-key-folders`")
    if spent >= mark[1]:
        return None
    return (f"the database is behind what this KME already handed out ({spent} keys used, {mark[1]} by "
            f"{path(folder)}): it was restored from a backup, or failed over to a standby that had not "
            "received the last commits; no key is handed out until an operator runs `flask restored-from-backup`")


def _parse(record: bytes) -> tuple[str, int] | None:
    try:
        database_id, spent = record.decode("ascii").split()
        return database_id, int(spent)
    except (UnicodeDecodeError, ValueError):
        return None
