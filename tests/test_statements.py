"""kme.storage.statements and kme.storage.compiled in process, on a temporary database of the pass's engine (the
zone link 1 holds the 64 keys of a.cor): each statement does what its callers rely on, whatever the size of its
lists."""
import pytest

from kme.storage import statements
from kme.storage.compiled import POSTGRESQL, SQLITE, Statement
from kme.storage.db import write_transaction
from kme.storage.models import OURS, PEERS, RESERVED


@pytest.fixture
def session(app):
    with app.app_context(), write_transaction() as session:
        yield session


def _states(session) -> dict[int, int]:
    rows = statements.pool_keys_at(session, {_file_id(session): list(range(64))})
    return {position: state for _id, _link, state, _file, position, _m in rows}


def _file_id(session) -> int:
    return statements.file_ids(session, 1, ["a.cor"])["a.cor"]


def test_claims_take_the_oldest_keys_reserve_the_next_and_lend_the_newest(session):
    connection = statements.driver(session)
    taken = statements.take_pool_keys(connection, 1, 3)
    reserved = statements.reserve_pool_keys(session, 1, 2, "r1")
    lent = statements.lend_pool_keys(session, 1, 2)

    assert [position for _file, position, _m in taken] == [0, 1, 2]
    assert [position for _id, _file, position, _m in reserved] == [3, 4]
    assert sorted(position for _file, position in lent) == [62, 63]
    states = _states(session)
    assert 0 not in states and states[3] == states[4] == RESERVED and states[63] == PEERS and states[5] == OURS
    assert sorted(position for _file, position, _m in statements.remove_reserved(session, 1, "r1")) == [3, 4]
    assert statements.remove_reserved(session, 1, "r1") == []
    assert statements.take_pool_keys(connection, 1, 100)[-1][1] == 61
    assert statements.take_pool_keys(connection, 1, 1) == []


def test_lookups_of_any_length_find_what_is_there(session):
    file_id = _file_id(session)
    # Longer than one statement's list: the lookup is split, and the parts are put together.
    wanted = list(range(5000))
    found = statements.pool_keys_at(session, {file_id: wanted})
    statements.delete_pool_keys(session, [key_id for key_id, *_ in found[:10]])

    assert sorted(position for *_, position, _m in found) == list(range(64))
    assert statements.file_names(session, [file_id, 10 ** 6]) == {file_id: "a.cor"}
    assert statements.file_ids(session, 1, ["a.cor", "b.cor"]) == {"a.cor": file_id}
    assert sorted(_states(session)) == list(range(10, 64))


def test_delivered_keys_their_slaves_and_erasure(session):
    # More keys than one multi-row INSERT holds.
    keys = [(f"00000000-0000-4000-8000-{number:012d}", 1, 1, b"m" * 48, "2026-12-05T00:00:00Z")
            for number in range(700)]
    key_ids = [key[0] for key in keys]
    statements.insert_delivered(session, keys, [(key_id, 2) for key_id in key_ids])
    statements.add_slaves(session, [(key_ids[0], 5)])
    connection = statements.driver(session)
    statements.mark_fetched(connection, key_ids[:2], 2)

    rows = statements.delivered_keys_and_slaves(connection, key_ids[:2])
    assert sorted((key_id, slave, bool(fetched)) for key_id, *_rest, slave, fetched in rows) == [
        (key_ids[0], 2, True), (key_ids[0], 5, False), (key_ids[1], 2, True)]
    assert {key_id: sorted(slaves) for key_id, slaves in statements.slaves_of(session, key_ids[:1]).items()} == {
        key_ids[0]: [2, 5]}
    assert statements.any_delivered(session, ["nothing", key_ids[699]])
    assert len(statements.delivered_material(session, key_ids)) == 700
    assert sorted(row[0] for row in statements.delete_delivered(session, key_ids[:3] + ["nothing"])) == key_ids[:3]
    assert not statements.any_delivered(session, key_ids[:3])
    assert statements.slaves_of(session, key_ids[:1]) == {}


def test_link_counters_add_and_columns_are_set(session):
    before = statements.link_row(session, 1, ("available", "delivered", "peer_free"))
    statements.update_link(session, 1, {"available": -3, "delivered": 3}, None)
    statements.set_link(session, 1, peer_free=17, progress_seen=4)

    assert statements.link_row(session, 1, ("available", "delivered", "peer_free", "progress_seen")) == (
        before[0] - 3, before[1] + 3, 17, 4)
    assert statements.spent_total(session) == before[1] + 3


def test_fingerprints_stored_before_come_back(session):
    assert statements.add_fingerprints(session, {11, 12, 13}) == set()
    assert statements.add_fingerprints(session, {13, 14, 11}) == {11, 13}
    assert statements.add_fingerprints(session, {14}) == {14}


def test_activations_in_and_out(session):
    statements.insert_outgoing(session, "a1", 1, "pending", "2026-12-05T00:00:00Z", "{}")
    statements.insert_incoming(session, "a2", 1, "relaying", "[]", "2026-12-05T00:00:00Z", relay="{}")

    assert statements.take_outgoing(session, "a1", ("done",)) is None
    assert tuple(statements.take_outgoing(session, "a1", ("done", "pending"))) == (1, "{}")
    assert statements.take_outgoing(session, "a1", ("pending",)) is None
    assert tuple(statements.incoming_activation(session, "a2")) == (1, "relaying", "[]")
    assert not statements.set_incoming_relay(session, "a2", "passed", "{1}", expected="asked")
    assert statements.set_incoming_relay(session, "a2", "passed", "{1}", expected="relaying")
    assert tuple(statements.incoming_relay(session, "a2")) == ("passed", "{1}")


@pytest.mark.engine_independent
def test_each_driver_gets_its_own_parameters_and_sqlite_no_row_locks():
    take_sqlite = statements._TAKE.form(SQLITE)
    take_postgresql = statements._TAKE.form(POSTGRESQL)
    lookup = statements._FILE_NAMES.form(POSTGRESQL, (3,))

    assert "?" in take_sqlite.sql and "%s" not in take_sqlite.sql and "FOR UPDATE" not in take_sqlite.sql
    assert "?" not in take_postgresql.sql and "FOR UPDATE SKIP LOCKED" in take_postgresql.sql
    assert lookup.sql.count("%s") == 3 and lookup.order == (("ids", 0), ("ids", 1), ("ids", 2))
    # Compiled once per dialect and size.
    assert statements._FILE_NAMES.form(POSTGRESQL, (3,)) is lookup


@pytest.mark.engine_independent
def test_a_row_statement_whose_parameters_are_not_its_row_is_refused():
    wrong = Statement(statements._REPLACE_POOL_MATERIAL._build, row=("id", "material"))

    with pytest.raises(ValueError, match="not the row"):
        wrong.form(SQLITE)
