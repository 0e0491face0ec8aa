"""Keys leave only from a database that has not gone back in time (kme.storage.handout_mark).

Every transaction that hands keys out (to an SAE, or activates them for a
peer's master) first checks the database's sum of final fates against the
mark, and the mark is raised once the transaction committed, before the
answer leaves. In a grouped write the units of one transaction share both
(kme.storage.db.transaction_scope): the mark is read once, before the first
unit reads the sum, and raised once after the commit, to the highest sum of
the units that succeeded. A KME on an in-memory database keeps no mark.
"""
import logging

from flask import current_app

from kme.errors import StorageFailure
from kme.storage import handout_mark, statements
from kme.storage.db import meta, read_connection, transaction_scope
from kme.storage.meta_names import DATABASE_ID

log = logging.getLogger(__name__)
_unwritable: set = set()
# The key of the mark in a transaction's scope.
_MARK = "hand-out mark"


def _place() -> tuple | None:
    """(the mark's folder, this database's ID), or None where no mark is kept."""
    config = current_app.extensions["kme"]
    if config.in_memory:
        return None
    return config.this_kme.key_directory_to_watch, meta(DATABASE_ID).decode()


def check(connection) -> int:
    """The database's sum of final fates, read in the caller's transaction; StorageFailure if it is behind the
    mark (the transaction must hand nothing out)."""
    place = _place()
    # The mark first, then the sum (kme.storage.handout_mark says why): in a shared transaction, the mark is
    # read before its first unit reads the sum.
    scope = transaction_scope()
    mark = None if place is None else (scope.once(_MARK, lambda: handout_mark.read(place[0])) if scope
                                       else handout_mark.read(place[0]))
    spent = statements.spent_total(connection)
    if place and (problem_found := handout_mark.problem(place[0], mark, place[1], spent)):
        raise StorageFailure(problem_found)
    return spent


def record_once_committed(spent: int) -> None:
    """In a unit of a grouped write that hands keys out: raise the mark to ``spent`` (the sum the unit leaves)
    once its transaction committed, before any of its callers gets an answer; with the transaction's other
    units, once, to the highest."""
    transaction_scope().after_commit(_MARK, spent, record)


def record(spent: int) -> None:
    """Raise the mark to ``spent`` (a sum the caller's transaction committed, or less)."""
    place = _place()
    if place is None:
        return
    try:
        handout_mark.advance(place[0], place[1], spent)
    except OSError as exc:
        # Like the folder mark, a safeguard: a folder the KME may not write keeps no mark, and says so once.
        if place[0] not in _unwritable:
            _unwritable.add(place[0])
            log.warning("hand-out mark not written in %s (%s): a restored database would not be detected",
                        place[0], exc.strerror)


def problem() -> str | None:
    """Why keys are refused (the database is behind the mark), or None: for /healthz."""
    place = _place()
    if place is None:
        return None
    mark = handout_mark.read(place[0])
    with read_connection() as connection:
        return handout_mark.problem(place[0], mark, place[1], statements.spent_total(connection))
