"""The event log, in process on a temporary database."""
from kme.storage import events
from kme.storage.db import write_transaction
from tests.support import Ledger


def test_events_of_one_change_are_one_statement_and_the_worker_keeps_the_newest(app, config_path, monkeypatch):
    monkeypatch.setattr(events, "KEPT_EVENTS", 3)
    with app.app_context():
        with write_transaction() as session:
            events.record(session, "one", "two\nforged", "three", "four")
            events.record(session)
        events.prune()
    rows = Ledger(config_path.parent / "kme.db")._query("SELECT message FROM events ORDER BY id")
    assert [message for (message,) in rows] == ["two\\nforged", "three", "four"]
