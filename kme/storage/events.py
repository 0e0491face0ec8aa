"""The KME's event log: short lines for operators, never key material."""
import logging

from sqlalchemy import delete, func, select

from kme.clock import utc_now
from kme.storage import statements
from kme.storage.db import write_transaction
from kme.storage.models import Event
from kme.text import printable

log = logging.getLogger("kme.events")

# Older events are pruned by the background worker; the debugging page shows the newest.
KEPT_EVENTS = 10_000


def record(transaction, *messages: str) -> None:
    """Add events in the caller's transaction (a Session, or the connection of a group commit), and log them.

    They commit or roll back with the change. One statement for all of them, past the ORM's unit of work (this is on
    the path of every key handed out). Control characters and undecodable
    bytes (from file names, say) are escaped.
    """
    if not messages:
        return
    now = utc_now()
    rows = []
    for message in messages:
        message = printable(message)
        log.info("%s", message)
        rows.append((now, message))
    statements.insert_events(transaction, rows)


def prune() -> None:
    """Keep the newest KEPT_EVENTS events (the background worker's periodic work)."""
    with write_transaction() as session:
        newest = session.scalar(select(func.max(Event.id)))
        if newest is not None and newest > KEPT_EVENTS:
            session.execute(delete(Event).where(Event.id <= newest - KEPT_EVENTS))


def recent(session, limit: int = 100) -> list[Event]:
    """The newest ``limit`` events, oldest first."""
    rows = session.scalars(select(Event).order_by(Event.id.desc()).limit(limit)).all()
    return rows[::-1]
