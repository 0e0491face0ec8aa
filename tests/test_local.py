"""kme.storage.keystore.local in process, on a temporary database of the pass's engine: zone keys taken all or
nothing from consecutive pool keys, fetched once by each of their slaves and erased after the last, a refusal
of the domain's check changing nothing, unfetched keys expiring, the hand-out mark raised, and the counters
that Get status reads following every commit."""
import pytest

from kme import clock
from kme.errors import NotAuthorized, NotEnoughKeys
from kme.storage import handout_mark
from kme.storage.keystore import common, local
from tests.support import Ledger

ZONE = 1


@pytest.fixture
def ledger(app, config_path):
    return Ledger(config_path.parent / "kme.db")


def allow(_found) -> None:
    """The domain's check, letting every fetch through."""


def waiting(ledger) -> list[str]:
    return [key_id for (key_id,) in ledger._query("SELECT key_id FROM delivered_keys ORDER BY key_id")]


def test_a_key_is_built_from_consecutive_pool_keys_and_the_mark_raised(app, ledger, config_path):
    data = (config_path.parent / "keys" / "a.cor").read_bytes()
    with app.app_context():
        keys = local.deliver_local(ZONE, 1, [2], 2, 512)
    assert [key.material for key in keys] == [data[0:64], data[64:128]]
    counts = ledger.assert_exact(ZONE)
    assert (counts["available"], counts["delivered"]) == (60, 4)
    assert handout_mark.read(config_path.parent / "keys")[1] == 4


def test_the_counters_and_histograms_read_for_status_and_entropy_follow_every_commit(app, ledger):
    """Get status and entropy may answer from their last read while nothing was committed (on SQLite): a hand-out
    by this process, or a change by another connection, shows at once."""
    with app.app_context():
        assert common.link_counts(ZONE).available == 64
        before = common.link_histograms()
        assert common.link_counts(ZONE).available == 64 and common.link_histograms() == before
        keys = local.deliver_local(ZONE, 1, [2], 2, 256)
        assert common.link_counts(ZONE).available == 62 and common.link_histograms() == before
        # The material leaves the KME once the slave has it.
        local.fetch_delivered(1, 2, [key.key_id for key in keys], allow)
        assert common.link_histograms() != before
        ledger.write(("UPDATE links SET available = available - 1 WHERE peer_kme_id = ?", ZONE))
        assert common.link_counts(ZONE).available == 61


def test_a_request_the_pool_cannot_serve_whole_takes_nothing(app, ledger):
    with app.app_context(), pytest.raises(NotEnoughKeys, match="65 keys of 256 bits, 64 available"):
        local.deliver_local(ZONE, 1, [2], 65, 256)
    assert ledger.assert_exact(ZONE)["available"] == 64
    assert waiting(ledger) == []


def test_a_key_of_two_slaves_is_erased_once_both_fetched_it(app, ledger):
    seen = []
    with app.app_context():
        (key,) = local.deliver_local(ZONE, 1, [2, 3], 1, 256)
        assert local.fetch_delivered(1, 2, [key.key_id], seen.append)[0].material == key.material
        assert waiting(ledger) == [key.key_id]
        assert local.fetch_delivered(1, 3, [key.key_id], seen.append)[0].material == key.material
    # The check saw the master and whether this slave had it already.
    assert seen == [{key.key_id: (1, False)}, {key.key_id: (1, False)}]
    assert waiting(ledger) == []


def test_the_domains_refusal_changes_nothing(app, ledger):
    with app.app_context():
        (key,) = local.deliver_local(ZONE, 1, [2], 1, 256)

        def refuse(_found):
            raise NotAuthorized("not a slave of this key")

        with pytest.raises(NotAuthorized):
            local.fetch_delivered(1, 2, [key.key_id], refuse)
        assert waiting(ledger) == [key.key_id]
        assert local.fetch_delivered(1, 2, [key.key_id], allow)[0].material == key.material


def test_keys_no_slave_fetched_expire_oldest_first(app, ledger):
    with app.app_context():
        first = local.deliver_local(ZONE, 1, [2], 2, 256)
        later = local.deliver_local(ZONE, 1, [2], 1, 256)
        assert local.expire_delivered(clock.utc_now(seconds_ago=-60), limit=2) == 2
        assert waiting(ledger) == [later[0].key_id]
        assert local.expire_delivered(clock.utc_now(seconds_ago=3600)) == 0
    assert not {key.key_id for key in first} & set(waiting(ledger))
    assert ledger.assert_exact(ZONE)["delivered"] == 3
