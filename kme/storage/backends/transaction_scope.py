"""What the units of work of one write transaction share (kme.storage.db.grouped_write): a value read once for
all of them, and an action taken once, after the commit, with the highest value its units asked for.

SQLite's group commit runs the units of many callers in one transaction; an
action such as raising the hand-out mark (kme.storage.handout_mark) then
costs one file write per transaction instead of one per caller, and a read
that must precede every unit's own reads is made once, before the first.
A unit that raises leaves no action behind: it was undone.
"""
import threading
from collections.abc import Callable


class TransactionScope:
    """The shared values and after-commit actions of one write transaction; used by the thread that runs its
    units."""

    def __init__(self):
        self._values: dict = {}
        # key -> (highest value of the units that succeeded, action); and what the running unit asked for.
        self._after: dict = {}
        self._unit: dict = {}

    def once(self, key, make: Callable):
        """``make()``, made once for the whole transaction (by its first unit that asks)."""
        if key not in self._values:
            self._values[key] = make()
        return self._values[key]

    def after_commit(self, key, value: int, action: Callable[[int], None]) -> None:
        """Once the transaction committed, and before any of its callers gets its answer: ``action(highest)``,
        the highest ``value`` that its units which succeeded gave with ``key``."""
        _keep_highest(self._unit, key, value, action)

    def unit_ended(self, succeeded: bool) -> None:
        """The running unit ended: what it asked for stands if it ``succeeded``, and is dropped if it was
        undone."""
        if succeeded:
            for key, (value, action) in self._unit.items():
                _keep_highest(self._after, key, value, action)
        self._unit = {}

    def committed(self) -> None:
        """Take the after-commit actions (the transaction committed)."""
        for value, action in self._after.values():
            action(value)


def _keep_highest(actions: dict, key, value: int, action: Callable[[int], None]) -> None:
    held = actions.get(key)
    actions[key] = (value if held is None else max(value, held[0]), action)


class ScopeOfThread:
    """The scope of the write transaction whose units the current thread runs, if any."""

    def __init__(self):
        self._local = threading.local()

    def current(self) -> TransactionScope | None:
        """The scope of the transaction this thread runs units of, or None outside one."""
        return getattr(self._local, "scope", None)

    def enter(self) -> TransactionScope:
        """A new scope for the transaction this thread is about to run."""
        self._local.scope = TransactionScope()
        return self._local.scope

    def leave(self) -> None:
        """This thread's transaction ended (committed or not)."""
        self._local.scope = None
