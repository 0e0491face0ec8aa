"""kme.storage.keystore.handed_out in process, on a temporary database of the pass's engine: the hand-out mark
raised with every key that leaves, and a database behind it, or a mark of another database, handing out and
giving nothing, without a change."""
import threading

import pytest

from kme.errors import NotEnoughKeys, StorageFailure
from kme.storage import handout_mark
from kme.storage.db import meta
from kme.storage.keystore import handed_out, local
from kme.storage.meta_names import DATABASE_ID
from tests.support import ENGINE, Ledger

ZONE = 1


@pytest.fixture
def zone(app, config_path):
    return config_path.parent / "keys"


@pytest.fixture
def ledger(app, config_path):
    return Ledger(config_path.parent / "kme.db")


def allow(_found) -> None:
    """The domain's check, letting every fetch through."""


def test_the_mark_follows_every_key_that_leaves(app, zone):
    with app.app_context():
        database_id = meta(DATABASE_ID).decode()
        assert handed_out.problem() is None
        local.deliver_local(ZONE, 1, [2], 3, 256)
        assert handout_mark.read(zone) == (database_id, 3)
        local.deliver_local(ZONE, 1, [2], 1, 512)
        assert handout_mark.read(zone) == (database_id, 5)


def test_a_database_behind_the_mark_hands_out_and_gives_nothing(app, zone, ledger):
    with app.app_context():
        (key,) = local.deliver_local(ZONE, 1, [2], 1, 256)
        # As a backup restored under the KME would be: the mark knows of more keys than the database.
        handout_mark.reset(zone, meta(DATABASE_ID).decode(), 10)
        before = ledger.assert_exact(ZONE)
        with pytest.raises(StorageFailure, match="the database is behind what this KME already handed out"):
            local.deliver_local(ZONE, 1, [2], 1, 256)
        with pytest.raises(StorageFailure, match=r"\(1 keys used, 10 by "):
            local.fetch_delivered(1, 2, [key.key_id], allow)
        assert "restored from a backup" in handed_out.problem()
    assert ledger.assert_exact(ZONE) == before
    assert ledger._query("SELECT COUNT(*) FROM delivered_keys")[0][0] == 1
    assert handout_mark.read(zone)[1] == 10


def test_a_mark_of_another_database_refuses_too(app, zone, ledger):
    with app.app_context():
        handout_mark.reset(zone, "f" * 32, 0)
        with pytest.raises(StorageFailure, match=f"names database {'f' * 32}, not this one"):
            local.deliver_local(ZONE, 1, [2], 1, 256)
        assert "flask adopt-key-folders" in handed_out.problem()
    assert ledger.assert_exact(ZONE)["available"] == 64
    assert handout_mark.read(zone) == ("f" * 32, 0)


def test_hand_outs_at_once_leave_the_mark_at_the_sum_they_spent_and_a_refused_one_raises_nothing(app, zone, ledger):
    """Threads handing keys out together (shared transactions on SQLite, one each on PostgreSQL): the mark ends at
    the sum of what they spent (on PostgreSQL at most that: a transaction's sum does not count the ones that
    commit while it runs, each thread's one at most); a refused unit raises nothing."""
    failures = []

    def deliver(count: int) -> None:
        with app.app_context():
            for _ in range(count):
                try:
                    local.deliver_local(ZONE, 1, [2], 1, 256)
                except NotEnoughKeys as refusal:
                    failures.append(refusal)

    threads = [threading.Thread(target=deliver, args=(4,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    with app.app_context():
        database_id = meta(DATABASE_ID).decode()
        mark = handout_mark.read(zone)
        assert failures == [] and mark[0] == database_id
        assert mark[1] == 32 if ENGINE == "sqlite" else 32 - 7 <= mark[1] <= 32
        with pytest.raises(NotEnoughKeys):
            local.deliver_local(ZONE, 1, [2], 40, 256)
        assert handout_mark.read(zone) == mark
    assert ledger.assert_exact(ZONE)["available"] == 32
