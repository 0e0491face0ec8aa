"""Key material bound to what peers and slaves rely on: a pool key to its file's name (not the file's row ID), a
delivered key to its slave SAEs too. Every sealed key is opened at its old place and sealed again at its new one,
with the KEK of the configuration, in the upgrade's transaction (the tables do not change).

Revision ID: 0005
Revises: 0004
"""
import struct

import sqlalchemy as sa
from alembic import op
from flask import current_app

from kme.storage.kek import unwrap
from kme.storage.sealing import Sealer

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

# Rows re-sealed per statement batch: a pool of millions of keys never sits in memory at once.
_BATCH = 5000
_CLEAR_KEY_BYTES = 32

# The places of both versions, as they were when this step was written (later versions change sealing.py, not
# these).
_POOL_BY_ROW = struct.Struct(">cqqq")
_POOL_BY_NAME = struct.Struct(">cqq")
_DELIVERED_TO_MASTER = struct.Struct(">cqq")
_DELIVERED_TO_SLAVES = struct.Struct(">cqqH")


def _pool_by_row(link_id, file_id, _name, position) -> bytes:
    return _POOL_BY_ROW.pack(b"P", link_id, file_id, position)


def _pool_by_name(link_id, _file_id, name, position) -> bytes:
    return _POOL_BY_NAME.pack(b"N", link_id, position) + name.encode()


def _delivered_to_master(key_id, link_id, master_sae_id, _slaves) -> bytes:
    return _DELIVERED_TO_MASTER.pack(b"D", link_id, master_sae_id) + key_id.encode("ascii")


def _delivered_to_slaves(key_id, link_id, master_sae_id, slaves) -> bytes:
    encoded, ordered = key_id.encode(), sorted(set(slaves))
    return (_DELIVERED_TO_SLAVES.pack(b"E", link_id, master_sae_id, len(encoded)) + encoded
            + len(ordered).to_bytes(2, "big") + b"".join(slave.to_bytes(8, "big", signed=True) for slave in ordered))


def upgrade():
    _reseal(_pool_by_row, _pool_by_name, _delivered_to_master, _delivered_to_slaves)


def downgrade():
    _reseal(_pool_by_name, _pool_by_row, _delivered_to_slaves, _delivered_to_master)


def _sealer(connection) -> Sealer | None:
    """The database's sealer, with the KEK of the configuration; None for a database without a data key yet (its
    keys are in clear: the first start seals them at the new places)."""
    facts = dict(connection.execute(sa.text("SELECT name, value FROM kme_meta")).all())
    if "data_key" not in facts:
        return None
    return Sealer(unwrap(current_app.extensions["kme_kek"], facts))


def _reseal(pool_from, pool_to, delivered_from, delivered_to) -> None:
    connection = op.get_bind()
    sealer = _sealer(connection)
    if sealer is None:
        return
    after = 0
    while True:
        rows = connection.execute(sa.text(
            "SELECT p.id, p.link_id, p.file_id, f.name, p.position, p.material FROM pool_keys AS p "
            "JOIN key_files AS f ON f.id = p.file_id WHERE p.id > :after ORDER BY p.id LIMIT :batch"),
            {"after": after, "batch": _BATCH}).all()
        if not rows:
            break
        after = rows[-1][0]
        sealed = [(row, material) for *row, material in rows if len(material) != _CLEAR_KEY_BYTES]
        _store(connection, "UPDATE pool_keys SET material = :material WHERE id = :id", sealer, [
            (key_id, material, pool_from(*place), pool_to(*place)) for (key_id, *place), material in sealed],
               "a pool key")
    slaves: dict[str, list[int]] = {}
    for key_id, slave in connection.execute(sa.text("SELECT key_id, slave_sae_id FROM key_slaves")):
        slaves.setdefault(key_id, []).append(slave)
    delivered = connection.execute(sa.text(
        "SELECT key_id, link_id, master_sae_id, material FROM delivered_keys")).all()
    _store(connection, "UPDATE delivered_keys SET material = :material WHERE key_id = :id", sealer, [
        (key_id, material, delivered_from(key_id, link_id, master, slaves.get(key_id, ())),
         delivered_to(key_id, link_id, master, slaves.get(key_id, ())))
        for key_id, link_id, master, material in delivered], "a delivered key")


def _store(connection, statement: str, sealer: Sealer, rows: list[tuple], what: str) -> None:
    """Each (id, sealed, old place, new place) row's value opened at its old place and stored sealed at its new."""
    if not rows:
        return
    opened = [sealer.open(material, old, lambda: f"{what} ({key_id})") for key_id, material, old, _new in rows]
    resealed = sealer.seal(opened, [new for *_, new in rows])
    connection.execute(sa.text(statement), [{"material": value, "id": row[0]} for value, row in zip(resealed, rows)])
