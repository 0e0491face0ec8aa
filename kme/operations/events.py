"""The KME's event log: short lines for operators, never key material."""
import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select

from kme.operations.logs import printable
from kme.storage.models import Event

log = logging.getLogger("kme.events")

# Older events are pruned on write; the debugging page shows the newest.
KEPT_EVENTS = 10_000


def utc_now(seconds_ago: float = 0) -> str:
    """The current time (or ``seconds_ago`` before it) as the event log writes it: ISO 8601, microseconds, Z.

    All stored times use this form, so they compare correctly as strings.
    """
    moment = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def record(session, message: str) -> None:
    """Add an event in the caller's transaction (so it commits or rolls back with the change), and log it.

    Control characters and undecodable bytes (from file names, say) are escaped.
    """
    message = printable(message)
    log.info("%s", message)
    event = Event(created_at=utc_now(), message=message)
    session.add(event)
    session.flush()
    if event.id > KEPT_EVENTS and event.id % 100 == 0:
        session.execute(delete(Event).where(Event.id <= event.id - KEPT_EVENTS))


def recent(session, limit: int = 100) -> list[Event]:
    """The newest ``limit`` events, oldest first."""
    rows = session.scalars(select(Event).order_by(Event.id.desc()).limit(limit)).all()
    return rows[::-1]
