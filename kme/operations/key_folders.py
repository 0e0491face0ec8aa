"""Key folders as the ingestion sees them: the marks that bind a folder to its databases, and open writers.

A lost or replaced database would otherwise ingest every key file still in
the folders again and hand out keys that were already used. The mark
``.kme-database.<KME ID>`` in each key folder names the database of that KME
that ingests the folder; a database with another ID leaves the folder alone
until the operator decides with ``flask adopt-key-folders``. One mark per KME
lets both KMEs of a link read one folder on one host, as the KMEs of a test
bench do: each is bound to its own database.

Releases before the marks were per KME wrote one ``.kme-database``. A KME
whose database it names takes it over as its own mark; a mark of another
database stays a refusal (it may be this KME's lost database as well as the
other KME's), until an operator adopts the folder.
"""
import os
from pathlib import Path

from kme import ids
from kme.storage import handout_mark

MARK_PREFIX = ".kme-database"
# The single mark of earlier releases.
LEGACY_MARK = MARK_PREFIX
_STAGING_SUFFIX = ".new"
# A KME ID longer than this is named by its digest in the mark's file name: file names stop at 255 bytes.
_NAME_ID_MAX = 64
# Flags in /proc/<pid>/fdinfo are octal; O_WRONLY = 1, O_RDWR = 2.
_ACCESS_MODE = 0o3


def is_mark(name: str) -> bool:
    """Whether a folder entry is a folder mark (or its staging copy) or the hand-out mark's folder, not a key
    file."""
    return name.startswith(MARK_PREFIX) or name == handout_mark.MARK_NAME


def mark_name(kme_id) -> str:
    """The file name of the mark of KME ``kme_id`` (an ID as configured)."""
    return f"{MARK_PREFIX}.{ids.in_file_name(kme_id, _NAME_ID_MAX)}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable mark ({exc.__class__.__name__})"


def read_mark(directory: Path, kme_id) -> str | None:
    """The database ID that binds the folder for KME ``kme_id``: its own mark, else an earlier release's single
    mark; None if there is neither."""
    return _read(directory / mark_name(kme_id)) or _read(directory / LEGACY_MARK)


def write_mark(directory: Path, kme_id, database_id: str) -> None:
    """Bind the folder to ``database_id`` for KME ``kme_id`` (written aside, then renamed: never half a mark)."""
    name = mark_name(kme_id)
    staging = directory / (name + _STAGING_SUFFIX)
    staging.write_text(database_id + "\n", encoding="ascii")
    os.replace(staging, directory / name)


def claim(directory: Path, kme_id, database_id: str) -> str | None:
    """Bind a folder that no database of KME ``kme_id`` marked to this database; why the folder must not be
    ingested, or None.

    An earlier release's single mark naming this database becomes this KME's
    own mark and is removed, so that the other KME of a link reading the same
    folder can claim it too. A folder the KME cannot write to stays unmarked
    and is ingested anyway: the mark is a safeguard, not a requirement.
    """
    own = _read(directory / mark_name(kme_id))
    legacy = None if own is not None else _read(directory / LEGACY_MARK)
    mark = own or legacy
    if mark is not None and mark != database_id:
        return (f"key folder {directory} was ingested by another database ({mark}); its files are not "
                "ingested until an operator runs `flask adopt-key-folders`")
    if own is None:
        try:
            write_mark(directory, kme_id, database_id)
            if legacy is not None:
                (directory / LEGACY_MARK).unlink(missing_ok=True)
        except OSError:
            pass
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
