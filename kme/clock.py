"""The KME's clock for stored times: one text form, so that times compare correctly as strings."""
from datetime import datetime, timedelta, timezone


def utc_now(seconds_ago: float = 0) -> str:
    """The current time (or ``seconds_ago`` before it) as the KME stores times: ISO 8601, microseconds, Z.

    All stored times use this form, so they compare correctly as strings.
    """
    moment = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def seconds_since(stored: str) -> float:
    """Seconds from a stored time (utc_now's form) to now."""
    return (datetime.now(timezone.utc) - datetime.fromisoformat(stored)).total_seconds()
