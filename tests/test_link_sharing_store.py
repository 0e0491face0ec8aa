"""The key store's side of link sharing, in process on a temporary database: confirmation, set-aside, leases."""
import uuid

import pytest

from kme.errors import ActivationConflict
from kme.storage.keystore import incoming, leases, progress
from kme.storage.keystore.incoming import ActivationRequest
from tests.store_apps import kme, peer_says


def events_of(ledger) -> list[str]:
    return [message for (message,) in ledger._query("SELECT message FROM events")]


@pytest.fixture
def arbiter(tmp_path, pki):
    return kme(tmp_path, pki, 1, 2)


def test_only_keys_both_ends_hold_are_confirmed_and_the_arbiter_owns_them(arbiter):
    app, ledger = arbiter
    assert ledger.assert_exact(2)["unconfirmed"] == 10
    with app.app_context():
        peer_says(1, 2, 6)
    counts = ledger.assert_exact(2)
    assert (counts["available"], counts["peer_held"], counts["unconfirmed"]) == (6, 0, 4)


def test_a_push_naming_a_new_file_twice_records_it_once(arbiter):
    """Found by the fuzz of the inter-KME interface: the second mention made a second row (503)."""
    app, ledger = arbiter
    with app.app_context():
        progress.incoming(1, 2, "cd" * 16, progress.Exchange("ab" * 16, [
            progress.FileOffer("new.cor", 3, 1), progress.FileOffer("new.cor", 4, 2)], 0, 0), None)
    assert ledger._query("SELECT peer_position FROM key_files WHERE name = 'new.cor'") == [(4,)]
    ledger.assert_exact(2)


def test_the_other_end_holds_confirmed_keys_for_the_arbiters_direction(tmp_path, pki):
    app, ledger = kme(tmp_path, pki, 3, 1)
    with app.app_context():
        peer_says(3, 1, 10)
    counts = ledger.assert_exact(1)
    assert (counts["available"], counts["peer_held"], counts["unconfirmed"]) == (0, 10, 0)


def test_keys_only_this_end_holds_are_set_aside_after_the_grace_period_and_no_longer_offered(arbiter):
    app, ledger = arbiter
    with app.app_context():
        peer_says(1, 2, 6)
        assert progress.set_aside_unmatched(1, 2, 3600) == 0
        assert progress.set_aside_unmatched(1, 2, 0) == 4
        assert progress.set_aside_unmatched(1, 2, 0) == 0
        push, _ = progress.outgoing(2, "cd" * 16)
        # The peer learns our capped offer, and a later, longer offer of its own confirms nothing more.
        assert [(item.name, item.offered) for item in push.files] == [("link.cor", 6)]
        peer_says(1, 2, 10, seq=2)
    counts = ledger.assert_exact(2)
    assert (counts["available"], counts["unconfirmed"], counts["set_aside"]) == (6, 0, 4)


def test_a_file_the_peer_never_reported_is_never_set_aside(arbiter):
    """The peer answers, but of other files only (its progress lags, or its cursor of ours is lost): our keys of
    link.cor wait, whatever the grace period, until the peer reported what it holds of the file."""
    app, ledger = arbiter
    with app.app_context():
        progress.answered(1, 2, 0, progress.Exchange("ab" * 16, [progress.FileOffer("other.cor", 0, 1)], 0, 0))
        assert progress.set_aside_unmatched(1, 2, 0) == 0
        peer_says(1, 2, 0, seq=2)
        assert progress.set_aside_unmatched(1, 2, 0) == 10
    assert ledger.assert_exact(2)["set_aside"] == 10


def test_a_file_the_peer_names_first_is_reported_back_as_not_held(arbiter):
    """So that the peer may set its keys of it aside once the grace period is over."""
    app, _ledger = arbiter
    with app.app_context():
        progress.incoming(1, 2, "cd" * 16, progress.Exchange("ab" * 16, [progress.FileOffer("new.cor", 3, 1)], 0, 0),
                          None)
        push, _ = progress.outgoing(2, "cd" * 16)
    assert ("new.cor", 0) in [(item.name, item.offered) for item in push.files]


def test_a_peer_with_more_of_our_changes_than_we_made_hears_all_of_them_again(arbiter):
    """Its cursor of our changes is past our last one: our database went back (a restore, a failover) or the
    peer is wrong. We answer with every file and go on pushing our changes."""
    app, ledger = arbiter
    with app.app_context():
        answer = progress.incoming(1, 2, "cd" * 16, progress.Exchange("ab" * 16, [], 0, 2**40), "cd" * 16)
        assert [item.name for item in answer.files] == ["link.cor"]
        push, _ = progress.outgoing(2, "cd" * 16)
    assert [item.name for item in push.files] == ["link.cor"]
    assert "KME 2 has our changes up to 1099511627776, past our last (1): this database went back " \
           "(a restore or a failover?); all our files are announced again" in events_of(ledger)


def test_an_answer_with_more_of_our_changes_than_we_made_does_not_stop_our_pushes(arbiter):
    app, ledger = arbiter
    with app.app_context():
        progress.answered(1, 2, 0, progress.Exchange("ab" * 16, [], 0, 2**40))
        push, _ = progress.outgoing(2, "cd" * 16)
    assert [item.name for item in push.files] == ["link.cor"]
    assert "KME 2 has our changes up to 1099511627776, past our last (1): this database went back " \
           "(a restore or a failover?); all our files are announced again" in events_of(ledger)


def test_a_peer_whose_last_change_is_before_changes_of_it_we_had_is_learnt_again(arbiter):
    """Its database went back: changes it makes now may reuse numbers we had, so we ask for all of them. A push
    that crossed our exchange carries an older last change, and proves nothing."""
    app, ledger = arbiter
    with app.app_context():
        peer_says(1, 2, 6, seq=5)
        progress.incoming(1, 2, "cd" * 16, progress.Exchange("ab" * 16, [], 0, 0, head=3), "cd" * 16)
        push, _ = progress.outgoing(2, "cd" * 16)
        assert push.seen == 5
        progress.answered(1, 2, push.seen, progress.Exchange("ab" * 16, [], 0, 0, head=3))
        push, _ = progress.outgoing(2, "cd" * 16)
    assert push.seen == 0
    assert "KME 2's last change (3) is before changes of it we had (5): its database went back " \
           "(a restore or a failover?); its progress is learnt again" in events_of(ledger)


def test_a_new_database_at_the_peer_is_learnt_afresh(arbiter):
    app, ledger = arbiter
    with app.app_context():
        peer_says(1, 2, 4)
        peer_says(1, 2, 8, database="ef" * 16)
        push, known = progress.outgoing(2, "cd" * 16)
    assert known == "ef" * 16 and push.seen == 1
    assert ledger.assert_exact(2)["available"] == 8
    assert "KME 2 has a new database: its ingestion progress is learnt again" in events_of(ledger)


def test_a_lease_is_all_or_nothing_at_most_half_beyond_the_minimum_and_idempotent(arbiter):
    app, ledger = arbiter
    with app.app_context():
        peer_says(1, 2, 10)
        assert leases.give(2, leases.LeaseRequest(str(uuid.uuid4()), 11, 11)) == ([], 10)
        request = leases.LeaseRequest(str(uuid.uuid4()), 1, 100)
        runs, free = leases.give(2, request)
        assert (sum(run["count"] for run in runs), free) == (5, 5)
        assert leases.give(2, request) == (runs, 5)
        runs, free = leases.give(2, leases.LeaseRequest(str(uuid.uuid4()), 4, 4))
        assert (sum(run["count"] for run in runs), free) == (4, 1)
        with pytest.raises(ActivationConflict):
            leases.give(3, request)
    counts = ledger.assert_exact(2)
    assert (counts["available"], counts["peer_held"]) == (1, 9)


def test_a_lease_received_twice_moves_its_keys_once(tmp_path, pki):
    app, ledger = kme(tmp_path, pki, 3, 1)
    with app.app_context():
        peer_says(3, 1, 10)
        asked = leases.ask(1, str(uuid.uuid4()), 2)
        runs = [{"file": "link.cor", "first": 2, "count": 3}, {"file": "unknown.cor", "first": 0, "count": 1}]
        assert leases.receive(1, asked.lease_id, runs, 7) == 3
        assert leases.receive(1, asked.lease_id, runs, 7) == 0
    counts = ledger.assert_exact(1)
    assert (counts["available"], counts["peer_held"]) == (3, 7)


def activation_of(positions: list[int]) -> ActivationRequest:
    return ActivationRequest(str(uuid.uuid4()), 5, [1], 256,
                             [(str(uuid.uuid4()), [("link.cor", position)]) for position in positions])


def test_the_arbiter_never_lets_its_peer_activate_its_own_or_unconfirmed_keys(arbiter):
    app, ledger = arbiter
    with app.app_context():
        peer_says(1, 2, 6)
        with pytest.raises(ActivationConflict):
            incoming.activate(1, 2, activation_of([0]))
        with pytest.raises(ActivationConflict):
            incoming.activate(1, 2, activation_of([8]))
        runs, _ = leases.give(2, leases.LeaseRequest(str(uuid.uuid4()), 1, 1))
        assert incoming.activate(1, 2, activation_of([runs[0]["first"]])) == 1
    assert ledger.assert_exact(2)["delivered"] == 1


def test_the_other_end_activates_keys_the_arbiter_confirmed_first(tmp_path, pki):
    app, ledger = kme(tmp_path, pki, 3, 1)
    with app.app_context():
        # Nothing heard from KME 1 yet: its activation proves that it holds the keys, and they are its own.
        assert incoming.activate(3, 1, activation_of([0, 1])) == 2
    counts = ledger.assert_exact(1)
    assert (counts["unconfirmed"], counts["delivered"]) == (8, 2)

