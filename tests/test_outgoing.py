"""kme.storage.keystore.outgoing in process, on a temporary database of the pass's engine: the activations this
KME asks of a peer, from the keys of its own direction of the link. A reservation takes keys all or nothing; the
peer's confirmation delivers them (to this KME's own slaves too), a proven refusal gives them back, and an
unknown outcome holds them until the background worker cancels the activation at the peer and discards them."""
import pytest

from kme import clock
from kme.errors import NotEnoughKeys, PeerFailure
from kme.storage.keystore import local, outgoing
from tests.store_apps import kme, peer_says

PEER = 2


@pytest.fixture
def arbiter(tmp_path, pki):
    """KME 1, whose direction of the link to KME 2 holds the 10 keys both ends confirmed."""
    app, ledger = kme(tmp_path, pki, 1, PEER)
    with app.app_context():
        peer_says(1, PEER, 10)
    assert ledger.assert_exact(PEER)["available"] == 10
    return app, ledger


def counts(ledger) -> tuple[int, int, int, int]:
    found = ledger.assert_exact(PEER)
    return found["available"], found["reserved"], found["delivered"], found["discarded"]


def test_a_reservation_takes_keys_all_or_nothing_and_names_them_for_the_peer(arbiter):
    app, ledger = arbiter
    with app.app_context():
        with pytest.raises(NotEnoughKeys, match="11 keys of 256 bits, 10 available"):
            outgoing.reserve(PEER, 1, [5], [], 11, 256)
        assert counts(ledger) == (10, 0, 0, 0)
        reservation = outgoing.reserve(PEER, 1, [5], [], 2, 512)
    assert counts(ledger) == (6, 4, 0, 0)
    wire = reservation.request
    assert wire["master_SAE_ID"] == 1 and wire["slave_SAE_IDs"] == [5]
    assert [len(key["parts"]) for key in wire["keys"]] == [2, 2]


def test_a_confirmed_activation_delivers_its_keys_and_local_slaves_fetch_them(arbiter):
    app, ledger = arbiter
    with app.app_context():
        reservation = outgoing.reserve(PEER, 1, [5], [2], 1, 256)
        outgoing.finalize(reservation)
        (key,) = reservation.keys
        assert local.fetch_delivered(1, 2, [key.key_id], lambda _found: None)[0].material == key.material
        # Settled: a late second confirmation is refused, and the keys stay delivered.
        with pytest.raises(PeerFailure, match="answered after the activation was cancelled"):
            outgoing.finalize(reservation)
    assert counts(ledger) == (9, 0, 1, 0)


def test_a_proven_refusal_gives_the_keys_back(arbiter):
    app, ledger = arbiter
    with app.app_context():
        reservation = outgoing.reserve(PEER, 1, [5], [], 3, 256)
        outgoing.release(reservation.activation_id)
        outgoing.release(reservation.activation_id)
    assert counts(ledger) == (10, 0, 0, 0)


def test_an_unknown_outcome_holds_the_keys_until_the_activation_is_cancelled_and_discarded(arbiter):
    app, ledger = arbiter
    with app.app_context():
        reservation = outgoing.reserve(PEER, 1, [5], [], 3, 256)
        outgoing.mark_unknown(reservation.activation_id, "has an unknown outcome")
        # Neither given back nor delivered by a late answer once the cancel has begun.
        outgoing.release(reservation.activation_id)
        assert counts(ledger) == (7, 3, 0, 0)
        (pending,) = outgoing.to_settle(clock.utc_now(seconds_ago=3600))
        assert pending[0] == reservation.activation_id and pending[1] == PEER
        assert outgoing.begin_cancel(reservation.activation_id)
        with pytest.raises(PeerFailure):
            outgoing.finalize(reservation)
        outgoing.discard(reservation.activation_id)
        assert outgoing.to_settle(clock.utc_now()) == []
        assert not outgoing.begin_cancel(reservation.activation_id)
    assert counts(ledger) == (7, 0, 0, 3)
