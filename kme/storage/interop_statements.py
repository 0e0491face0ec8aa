"""The statements of the interop tables (kme.storage.models.InteropKey and InteropAck), past SQLAlchemy like those
of kme.storage.statements, so that they run in a relay's group commit as well as in a session."""
from sqlalchemy import bindparam, delete, func, insert, select, update

from kme.storage.compiled import Statement, many, run, run_many
from kme.storage.models import InteropAck, InteropKey, InteropSent
from kme.storage.statements import driver

_keys = InteropKey.__table__
_acks = InteropAck.__table__
_sent = InteropSent.__table__

_KEY_COLUMNS = ("key_id", "target_sae_id", "foreign_kms_id", "initiator_sae_id", "state", "reason", "ack_url",
                "created_at")
_INSERT_KEYS = Statement(insert(_keys).values(**{name: bindparam(name) for name in _KEY_COLUMNS}), row=_KEY_COLUMNS)
_KEYS_BY_ID = Statement(
    lambda key_ids: select(_keys.c.key_id, _keys.c.target_sae_id, _keys.c.foreign_kms_id, _keys.c.initiator_sae_id,
                           _keys.c.state, _keys.c.reason).where(_keys.c.key_id.in_(many("key_ids", key_ids))),
    lists=("key_ids",))
_KEYS_OF_PAIR = Statement(
    lambda targets: select(_keys.c.key_id, _keys.c.target_sae_id, _keys.c.state).where(
        _keys.c.foreign_kms_id == bindparam("foreign_kms_id"), _keys.c.initiator_sae_id == bindparam("initiator"),
        _keys.c.target_sae_id.in_(many("targets", targets))),
    lists=("targets",))
_SET_STATE = Statement(
    lambda key_ids: update(_keys).where(_keys.c.target_sae_id == bindparam("target"),
                                        _keys.c.state == bindparam("expected"),
                                        _keys.c.key_id.in_(many("key_ids", key_ids)))
    .values(state=bindparam("state"), reason=bindparam("reason")),
    lists=("key_ids",))
_IN_STATE_BEFORE = Statement(
    select(_keys.c.key_id, _keys.c.target_sae_id, _keys.c.foreign_kms_id, _keys.c.initiator_sae_id, _keys.c.ack_url)
    .where(_keys.c.state == bindparam("state"), _keys.c.created_at < bindparam("before"))
    .order_by(_keys.c.created_at).limit(bindparam("limit")))
_STATE_COUNTS = Statement(select(_keys.c.foreign_kms_id, _keys.c.state, func.count())
                          .group_by(_keys.c.foreign_kms_id, _keys.c.state))

_SENT_COLUMNS = ("key_id", "foreign_kms_id", "initiator_sae_id", "target_sae_id", "state", "message", "created_at")
_INSERT_SENT = Statement(insert(_sent).values(**{name: bindparam(name) for name in _SENT_COLUMNS}), row=_SENT_COLUMNS)
_SENT_BY_ID = Statement(
    lambda key_ids: select(_sent.c.key_id, _sent.c.foreign_kms_id, _sent.c.state, _sent.c.message)
    .where(_sent.c.key_id.in_(many("key_ids", key_ids))),
    lists=("key_ids",))
_SET_SENT = Statement(
    lambda key_ids: update(_sent).where(_sent.c.state == bindparam("expected"),
                                        _sent.c.key_id.in_(many("key_ids", key_ids)))
    .values(state=bindparam("state"), message=bindparam("message")),
    lists=("key_ids",))
_FORGET_SENT = Statement(delete(_sent).where(_sent.c.created_at < bindparam("before")))

_ACK_COLUMNS = ("foreign_kms_id", "url", "body", "state", "attempts", "next_at", "last_error", "created_at")
_INSERT_ACK = Statement(insert(_acks).values(**{name: bindparam(name) for name in _ACK_COLUMNS}))
_DUE_ACKS = Statement(select(_acks.c.id, _acks.c.foreign_kms_id, _acks.c.url, _acks.c.body, _acks.c.attempts)
                      .where(_acks.c.state == bindparam("state"), _acks.c.next_at <= bindparam("now"))
                      .order_by(_acks.c.next_at).limit(bindparam("limit")))
_SET_ACK = Statement(update(_acks).where(_acks.c.id == bindparam("ack_id"))
                     .values(state=bindparam("state"), attempts=bindparam("attempts"), next_at=bindparam("next_at"),
                             last_error=bindparam("last_error")))
_ACK_COUNTS = Statement(select(_acks.c.foreign_kms_id, _acks.c.state, func.count())
                        .group_by(_acks.c.foreign_kms_id, _acks.c.state))
_ACKS_IN_STATE = Statement(select(_acks.c.id, _acks.c.foreign_kms_id, _acks.c.url, _acks.c.attempts,
                                _acks.c.last_error, _acks.c.created_at)
                         .where(_acks.c.state == bindparam("state")).order_by(_acks.c.id.desc())
                         .limit(bindparam("limit")))
_FORGET_ACKS = Statement(delete(_acks).where(_acks.c.state == bindparam("state"),
                                             _acks.c.created_at < bindparam("before")))


def insert_keys(target, rows: list[tuple]) -> None:
    """Remember keys a foreign KMS passed us: one row per key and target SAE, in the order of _KEY_COLUMNS."""
    run_many(driver(target), _INSERT_KEYS, rows)


def keys_by_id(target, key_ids: list[str]) -> list[tuple]:
    """(key_id, target_sae_id, foreign_kms_id, initiator_sae_id, state, reason) of every row of ``key_ids``."""
    return run(driver(target), _KEYS_BY_ID, key_ids=key_ids).fetchall()


def keys_of_pair(target, foreign_kms_id, initiator, targets: list) -> list[tuple]:
    """(key_id, target_sae_id, state) of every key a foreign KMS passed for ``initiator`` and one of ``targets``."""
    return run(driver(target), _KEYS_OF_PAIR, foreign_kms_id=foreign_kms_id, initiator=initiator,
               targets=targets).fetchall()


def set_state(target, key_ids: list[str], target_sae_id, expected: str, state: str, reason: str = "") -> int:
    """Move the rows of ``key_ids`` for one target SAE from ``expected`` to ``state``; how many moved."""
    return run(driver(target), _SET_STATE, key_ids=key_ids, target=target_sae_id, expected=expected, state=state,
               reason=reason).rowcount


def in_state_before(target, state: str, before: str, limit: int) -> list[tuple]:
    """(key_id, target_sae_id, foreign_kms_id, initiator_sae_id, ack_url) of up to ``limit`` rows in ``state``
    since before ``before``, oldest first."""
    return run(driver(target), _IN_STATE_BEFORE, state=state, before=before, limit=limit).fetchall()


def state_counts(target) -> list[tuple]:
    """(foreign_kms_id, state, rows) over every key foreign KMSs passed us (operators' pages only)."""
    return run(driver(target), _STATE_COUNTS).fetchall()


def insert_sent(target, rows: list[tuple]) -> None:
    """Remember keys passed to a foreign KMS: rows in the order of _SENT_COLUMNS."""
    run_many(driver(target), _INSERT_SENT, rows)


def sent_by_id(target, key_ids: list[str]) -> list[tuple]:
    """(key_id, foreign_kms_id, state, message) of the keys among ``key_ids`` passed to a foreign KMS."""
    return run(driver(target), _SENT_BY_ID, key_ids=key_ids).fetchall()


def set_sent(target, key_ids: list[str], expected: str, state: str, message: str) -> int:
    """Move keys passed to a foreign KMS from ``expected`` to ``state``; how many moved."""
    return run(driver(target), _SET_SENT, key_ids=key_ids, expected=expected, state=state,
               message=message).rowcount


def forget_sent(target, before: str) -> None:
    """Forget keys passed to a foreign KMS before ``before``."""
    run(driver(target), _FORGET_SENT, before=before)


def insert_ack(target, **values) -> None:
    """Put an acknowledgement in the outbox (the columns of _ACK_COLUMNS, by name)."""
    run(driver(target), _INSERT_ACK, **values)


def due_acks(target, state: str, now: float, limit: int) -> list[tuple]:
    """(id, foreign_kms_id, url, body, attempts) of up to ``limit`` acknowledgements in ``state`` due by ``now``."""
    return run(driver(target), _DUE_ACKS, state=state, now=now, limit=limit).fetchall()


def set_ack(target, ack_id: int, state: str, attempts: int, next_at: float, last_error: str) -> None:
    """Record an attempt to send an acknowledgement, and what comes next."""
    run(driver(target), _SET_ACK, ack_id=ack_id, state=state, attempts=attempts, next_at=next_at,
        last_error=last_error)


def ack_counts(target) -> list[tuple]:
    """(foreign_kms_id, state, acknowledgements) of the outbox (operators' pages only)."""
    return run(driver(target), _ACK_COUNTS).fetchall()


def acks_in_state(target, state: str, limit: int) -> list[tuple]:
    """(id, foreign_kms_id, url, attempts, last_error, created_at) of the newest ``limit`` acknowledgements in
    ``state``."""
    return run(driver(target), _ACKS_IN_STATE, state=state, limit=limit).fetchall()


def forget_acks(target, state: str, before: str) -> None:
    """Delete the acknowledgements in ``state`` created before ``before``."""
    run(driver(target), _FORGET_ACKS, state=state, before=before)
