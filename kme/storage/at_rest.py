"""Encryption at rest: the data key of a database, wrapped by the KEK, and the material of its rows.

The data key (32 random bytes) is made with the database and stored in
kme_meta wrapped by the KEK (kme.storage.kek), bound to the database's ID:
a database written under one KEK never opens under another, and a wrapped
key copied into another database does not open there either. Every process
unwraps it once, at its first use of the database (kme.storage.schema.ensure_schema),
after checking at start that its KEK opens it (kme.storage.kek.check_database).

A database made by a KME before encryption at rest holds its pool in
clear. Its first open by this version makes the data key, seals the keys
waiting for their slaves and the histograms in the same transaction, and
marks the database as still holding clear pool keys, which
``flask encrypt-db`` seals in batches (encrypt_pool_batch); until then new
keys are sealed and clear ones still served. Once the mark is gone a clear
pool key is refused as an alteration.
"""
import logging
import os
import time
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import delete, insert, update

from kme.config import KEY_BITS
from kme.errors import StorageFailure
from kme.storage import sealing, statements
from kme.storage.db import db, meta, storage, write_transaction
from kme.storage.kek import Kek, KekError, context, rotation_over, unwrap
from kme.storage.meta_names import CLEAR_POOL, DATA_KEY, DATA_KEY_PREVIOUS, DATABASE_ID, FINGERPRINT_SECRET
from kme.storage.models import Meta
from kme.storage.sealing import Sealer

log = logging.getLogger(__name__)

DATA_KEY_BYTES = 32
FINGERPRINT_SECRET_BYTES = 32
CLEAR_KEY_BYTES = KEY_BITS // 8
HISTOGRAM_BYTES = 256 * 8
# Rows sealed per transaction by flask encrypt-db: short enough that SAE requests barely wait.
ENCRYPT_BATCH = 2000


@dataclass
class Store:
    """What a process knows of its database's encryption: the sealer, and whether clear keys may be left."""
    sealer: Sealer
    clear_pool: bool


def establish(connection, kek: Kek, facts: dict[str, bytes]) -> Store:
    """Unwrap the database's data key, or make it (sealing what a database from before held in clear).

    ``connection``: a SQLAlchemy connection inside the schema's write
    transaction; ``facts``: the kme_meta rows. StorageFailure if the KEK
    does not open the data key.
    """
    wrapped = facts.get(DATA_KEY)
    if wrapped is not None:
        opened = _opened(kek, facts)
    else:
        data_key = os.urandom(DATA_KEY_BYTES)
        connection.execute(insert(Meta).values(name=DATA_KEY, value=kek.wrap(data_key, context(facts[DATABASE_ID]))))
        opened = Store(Sealer(data_key), False)
        raw = connection.connection.driver_connection
        _seal_delivered_and_histograms(raw, opened.sealer)
        if statements.any_pool_key(raw):
            connection.execute(insert(Meta).values(name=CLEAR_POOL, value=b"1"))
            opened.clear_pool = True
    if opened.clear_pool:
        log.warning("the database holds pool keys in clear, written by a KME from before encryption at rest: they "
                    "are served, new keys are sealed; run flask encrypt-db to seal them")
    secret = facts.get(FINGERPRINT_SECRET)
    if secret is None:
        # Drawn and sealed at once: never written in clear (PostgreSQL's WAL would keep it).
        connection.execute(insert(Meta).values(name=FINGERPRINT_SECRET, value=opened.sealer.seal(
            [os.urandom(FINGERPRINT_SECRET_BYTES)], [sealing.secret_place()])[0]))
    elif len(secret) == FINGERPRINT_SECRET_BYTES:
        # One a KME before this release kept in clear: sealed in place.
        connection.execute(update(Meta).where(Meta.name == FINGERPRINT_SECRET).values(
            value=opened.sealer.seal([secret], [sealing.secret_place()])[0]))
    storage().at_rest = opened
    return opened


def _seal_delivered_and_histograms(raw, sealer: Sealer) -> None:
    """Seal the keys waiting for their slaves and the histograms a database from before held in clear."""
    rows = statements.all_delivered(raw)
    slaves = statements.slaves_of(raw, [key_id for key_id, *_ in rows])
    sealed = sealer.seal([material for *_, material in rows],
                         [sealing.delivered_place(key_id, link_id, master, slaves.get(key_id, ()))
                          for key_id, link_id, master, _m in rows])
    statements.replace_delivered_material(raw, [(value, row[0]) for value, row in zip(sealed, rows)])
    for link_id, histogram in statements.all_histograms(raw):
        if len(histogram) == HISTOGRAM_BYTES:
            statements.store_histogram(raw, link_id, seal_histogram(link_id, histogram, sealer))


def store() -> Store:
    """The encryption state of the app's database: established by ensure_schema, or opened here from the data key
    another process made (StorageFailure if the KEK does not open it)."""
    held = storage()
    if held.at_rest is None:
        if meta(DATA_KEY) is None:
            raise RuntimeError("the database has no data key yet (ensure_schema makes it)")
        facts = {name: meta(name) for name in (DATA_KEY, DATABASE_ID, DATA_KEY_PREVIOUS, CLEAR_POOL)}
        held.at_rest = _opened(current_app.extensions["kme_kek"],
                               {name: value for name, value in facts.items() if value is not None})
    return held.at_rest


def _opened(kek: Kek, facts: dict[str, bytes]) -> Store:
    """The store of the data key that ``kek`` (or, during a rotation, the previous wrap) opens, from the kme_meta
    rows ``facts``; StorageFailure (the KEK's one line) if it does not open."""
    try:
        return Store(Sealer(unwrap(kek, facts)), CLEAR_POOL in facts)
    except KekError as exc:
        raise StorageFailure(str(exc)) from None


def rewrap(kek: Kek, new: Kek, database_id: bytes, grace_seconds: float) -> bool:
    """Wrap the data key under ``new`` instead of ``kek``; False if it already was (nothing changed).

    The database is open (ensure_schema made its data key). One update of
    the kme_meta row, read and written under the write lock: the key rows
    are not touched and processes that have the data key open go on serving.
    The previous wrap is kept for ``grace_seconds`` (none if 0), so that a
    process started with the previous KEK meanwhile (a gunicorn master
    forking a worker again) still opens the database.
    """
    bound = context(database_id)
    with write_transaction() as session:
        row = session.get(Meta, DATA_KEY)
        try:
            new.unwrap(row.value, bound)
            return False
        except KekError:
            previous = row.value
            row.value = new.wrap(kek.unwrap(previous, bound), bound)
        session.execute(delete(Meta).where(Meta.name == DATA_KEY_PREVIOUS))
        if grace_seconds:
            expiry = int(time.time() + grace_seconds).to_bytes(8, "big")
            session.add(Meta(name=DATA_KEY_PREVIOUS, value=expiry + previous))
    return True


def end_rotation(expired_only: bool) -> bool:
    """Forget the previous wrap of the data key (only once expired if ``expired_only``); whether there was one."""
    with write_transaction() as session:
        row = session.get(Meta, DATA_KEY_PREVIOUS)
        if row is None or (expired_only and not rotation_over(row.value)):
            return False
        session.delete(row)
    return True


def rebind(session, kek: Kek, new_database_id: bytes) -> None:
    """Give the database a new ID in the caller's transaction: the data key is wrapped again for it (the wrap is
    bound to the ID); the key rows are not touched."""
    identity, wrapped = session.get(Meta, DATABASE_ID), session.get(Meta, DATA_KEY)
    wrapped.value = kek.wrap(kek.unwrap(wrapped.value, context(identity.value)), context(new_database_id))
    identity.value = new_database_id
    # A previous KEK's wrap is bound to the former ID: it could not open the database any more.
    session.execute(delete(Meta).where(Meta.name == DATA_KEY_PREVIOUS))


def encrypt_pool_batch(after_id: int) -> tuple[int, int | None]:
    """Seal up to ENCRYPT_BATCH clear pool keys with IDs above ``after_id``, in one transaction.

    (keys sealed, last ID seen); the last ID is None once no clear key is
    left, and then the database's clear mark is removed in the same
    transaction.
    """
    found = store()
    with write_transaction() as session:
        raw = statements.driver(session)
        rows = statements.clear_pool_keys(raw, after_id, ENCRYPT_BATCH)
        if not rows:
            session.execute(delete(Meta).where(Meta.name == CLEAR_POOL))
            found.clear_pool = False
            return 0, None
        names = statements.file_names(raw, {file_id for _id, _link, file_id, _p, _m in rows})
        sealed = found.sealer.seal([material for *_, material in rows],
                                   [sealing.pool_place(link_id, names[file_id], position)
                                    for _id, link_id, file_id, position, _m in rows])
        statements.replace_pool_material(raw, [(value, row[0]) for value, row in zip(sealed, rows)])
        return len(rows), rows[-1][0]


def open_pool(target, link_id: int, rows, names: dict[int, str] | None = None) -> list[bytes]:
    """The material of pool keys given as (file_id, position, stored) rows of one link, in their order, each
    opened for the name of its file: as ``names`` has it (by file ID) when the caller used those names, else as
    the transaction of ``target`` (a Session or a driver connection) reads it."""
    found = store()
    if names is None:
        names = statements.file_names(target, {file_id for file_id, _position, _stored in rows})
    if not any(len(stored) == CLEAR_KEY_BYTES for _file_id, _position, stored in rows):
        return found.sealer.open_pool(link_id, rows, names)
    opened = []
    for file_id, position, stored in rows:
        if len(stored) == CLEAR_KEY_BYTES:
            _clear_allowed(found, f"pool key {position} of key file {names[file_id]} on link {link_id}")
            opened.append(stored)
        else:
            opened.extend(found.sealer.open_pool(link_id, [(file_id, position, stored)], names))
    return opened


def _clear_allowed(found: Store, where: str) -> None:
    """A clear pool key is served only while the database still holds keys from before encryption at rest."""
    if found.clear_pool and CLEAR_POOL not in statements.meta_names(db.engine):
        found.clear_pool = False
    if not found.clear_pool:
        raise StorageFailure(f"{where} is stored in clear in an encrypted database: the database was altered "
                             "outside the KME")


def seal_pool(link_id: int, file_name: str, positions, materials: list[bytes]) -> list[bytes]:
    """Keys of one key file sealed for their places."""
    return store().sealer.seal_pool(link_id, file_name, positions, materials)


def seal_delivered(link_id: int, master_sae_id: int, slave_ids, keys) -> list[bytes]:
    """The material of delivered keys (key_id, material) sealed for their places."""
    return store().sealer.seal_delivered(link_id, master_sae_id, slave_ids, keys)


def open_delivered(key_id: str, link_id: int, master_sae_id: int, slave_ids, stored: bytes) -> bytes:
    """The material of a delivered key that ``slave_ids`` may fetch."""
    return store().sealer.open(stored, sealing.delivered_place(key_id, link_id, master_sae_id, slave_ids),
                               lambda: f"delivered key {key_id}")


def fingerprint_secret(stored: bytes) -> bytes:
    """The fingerprint secret, as kme_meta holds it (sealed; in clear only as a process that read it before this
    release sealed it saw it)."""
    if len(stored) == FINGERPRINT_SECRET_BYTES:
        return stored
    return store().sealer.open(stored, sealing.secret_place(), lambda: "the fingerprint secret")


def seal_histogram(link_id: int, histogram: bytes, sealer: Sealer | None = None) -> bytes:
    """A link's byte histogram sealed for its link (by this process's sealer unless one is given)."""
    return (sealer or store().sealer).seal([histogram], [sealing.histogram_place(link_id)])[0]


def open_histogram(link_id: int, stored: bytes) -> bytes:
    """A link's byte histogram (a clear one is the empty histogram of a new link)."""
    if len(stored) == HISTOGRAM_BYTES:
        return stored
    return store().sealer.open(stored, sealing.histogram_place(link_id),
                                     lambda: f"the byte histogram of link {link_id}")
