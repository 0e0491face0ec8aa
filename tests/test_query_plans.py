"""The statements of the activation path search indexes: their cost does not grow with the pool.

Every statement the key store runs while a peer's activation is accepted,
and while this KME reserves, finalizes and settles its own, is explained
with SQLite's EXPLAIN QUERY PLAN on a temporary database holding a real
pool; none may scan a table of keys.
"""
import re
import uuid

import pytest
from sqlalchemy import event

from kme import create_app
from kme.config import load_config
from kme.operations.ingest import ingest_directories
from kme.storage.db import db
from kme.storage.keystore import common, incoming, leases, local, outgoing, progress
from kme.storage.keystore.incoming import ActivationRequest
from kme.storage.schema import ensure_schema
from tests.network import Network
from tests.support import confirm_link, write_keys

pytestmark = pytest.mark.sqlite_only

KEY_TABLES = ("pool_keys", "delivered_keys", "key_slaves", "key_files", "key_fingerprints")


@pytest.fixture
def kme1(tmp_path, pki):
    network = Network(tmp_path, pki, [(1, 2)])
    network.write_link_file(1, 2, "a.cor", 5000)
    network.write_link_file(1, 2, "b.cor", 5000)
    write_keys(network[1].folder / "keys" / "local.cor", 5000)
    app = create_app(load_config(network[1].config))
    with app.app_context():
        ensure_schema()
        ingest_directories(app.extensions["kme"])
        confirm_link(1, 2)
        yield app


def explained(app, action) -> list[str]:
    """The query plan lines of every statement ``action`` runs, through SQLAlchemy or on the driver connection.

    Traced by sqlite3 itself on fresh connections, with the parameters
    expanded into the text (inserts aside).
    """
    statements = []

    def trace(statement):
        if re.match(r"\s*(SELECT|UPDATE|DELETE)", statement, re.I):
            statements.append(statement)

    def on_connect(dbapi_connection, _record):
        dbapi_connection.set_trace_callback(trace)

    engine = db.engine
    engine.dispose()
    event.listen(engine, "connect", on_connect)
    try:
        action()
    finally:
        event.remove(engine, "connect", on_connect)
        engine.dispose()
    plans = []
    raw = engine.raw_connection()
    try:
        for statement in statements:
            rows = raw.cursor().execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()
            plans += [f"{row[3]}  <-  {statement.split(chr(10))[0][:80]}" for row in rows]
    finally:
        raw.close()
    return plans


def full_scans(plans: list[str]) -> list[str]:
    return [plan for plan in plans for table in KEY_TABLES if re.match(rf"SCAN {table}\b", plan)]


def test_the_sae_hot_path_searches_indexes(kme1):
    # Its statements run on the driver connection, past SQLAlchemy: the trace sees them too.
    def hot_path():
        keys = local.deliver_local(1, 1, [2], 2, 512)
        local.fetch_delivered(1, 2, [key.key_id for key in keys], lambda found: None)
        common.link_counts(1)
        common.link_histograms()

    plans = explained(kme1, hot_path)
    assert any("ix_pool_keys_link_id_state_id" in plan for plan in plans), plans
    assert any("delivered_keys" in plan for plan in plans), plans
    assert not full_scans(plans), full_scans(plans)


def test_a_peers_activation_searches_by_file_and_position(kme1):
    # KME 1 arbitrates the link: KME 2's direction activates here only what KME 1 lent it.
    runs, _ = leases.give(2, leases.LeaseRequest(str(uuid.uuid4()), 4, 4))
    parts = [(run["file"], run["first"] + offset) for run in runs for offset in range(run["count"])]
    request = ActivationRequest(activation_id=str(uuid.uuid4()), master_sae_id=3, slave_ids=[1], size_bits=512,
                                keys=[(str(uuid.uuid4()), parts[:2]), (str(uuid.uuid4()), parts[2:])])
    plans = explained(kme1, lambda: incoming.activate(1, 2, request))
    assert any("(file_id=? AND position=?)" in plan for plan in plans), plans
    assert not full_scans(plans), full_scans(plans)
    plans = explained(kme1, lambda: incoming.cancel(1, 2, request))
    assert not full_scans(plans), full_scans(plans)


def test_sharing_the_link_searches_indexes(kme1):
    def sharing():
        runs, _ = leases.give(2, leases.LeaseRequest(str(uuid.uuid4()), 10, 100))
        asked = leases.ask(2, str(uuid.uuid4()), 1)
        leases.receive(2, asked.lease_id, runs, 0)
        push, known = progress.outgoing(2, "cd" * 16)
        progress.incoming(1, 2, "ef" * 16, progress.Exchange("ab" * 16, [progress.FileOffer("a.cor", 6000, 9)], 0,
                                                              0), known)
        progress.set_aside_unmatched(1, 2, 0)

    plans = explained(kme1, sharing)
    assert any("ix_pool_keys_link_id_state_id" in plan for plan in plans), plans
    assert not full_scans(plans), full_scans(plans)


def test_reserving_and_settling_our_own_activation_searches_indexes(kme1):
    def own_activation():
        reservation = outgoing.reserve(2, 1, [3], [2], 2, 512)
        outgoing.finalize(reservation)
        held = outgoing.reserve(2, 1, [3], [], 1, 256)
        outgoing.mark_unknown(held.activation_id, "has an unknown outcome")
        assert outgoing.begin_cancel(held.activation_id)
        outgoing.discard(held.activation_id)
        refused = outgoing.reserve(2, 1, [3], [], 1, 256)
        outgoing.release(refused.activation_id)

    plans = explained(kme1, own_activation)
    assert not full_scans(plans), full_scans(plans)
    # Reserved keys are found by their reservation, never by walking the link's keys (the link's index would
    # make a relay's or an activation's settling grow with the pool).
    by_reservation = [plan for plan in plans if re.search(r"WHERE (pool_keys\.)?reservation = ", plan)]
    assert len(by_reservation) >= 3, plans
    assert all("ix_pool_keys_reservation" in plan for plan in by_reservation), by_reservation
