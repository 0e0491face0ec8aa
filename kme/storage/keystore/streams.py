"""ETSI GS QKD 004 key streams in the key store (docs/etsi004.md): the stream's ends, and its chunks.

A chunk is a key of the stream's link, made when either end first asks for
its index: consecutive pool keys, its unused bits discarded as for any key,
stored sealed as a delivered key of the master SAE under a key ID derived
from the KSID and the index (nothing of its material). In the zone, both
ends are its "slaves"; across two KMEs, the master's KME claims the index,
activates the key at the slave's KME (kme.domain.streams) and keeps its
copy for the master, the slave's KME records the chunk as it arrives. Each
end reads it once; once both did, it is erased. The chunk's row stays while
the stream lives, so that an index is never made twice.
"""
import uuid
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import delete, func, select

from kme import clock, ids
from kme.errors import NotEnoughKeys
from kme.ids import Id
from kme.storage import at_rest, events, statements
from kme.storage.db import db, write_transaction
from kme.storage.keystore import handed_out
from kme.storage.keystore.common import build_keys, erase_delivered, pool_keys_per_key, store_delivered, update_link
from kme.storage.models import KeyFile, KeyStream, StreamChunk

# An end of a stream.
ABSENT, WAITING, OPEN = "absent", "waiting", "open"
# A chunk's index: this caller may make it, or it is made, or another is making it.
CLAIMED, MADE, MAKING = "claimed", "made", "making"
# The window over which a link's key rate is measured (Min_bps is checked against it).
RATE_WINDOW_SECONDS = 3600
# The namespace of the key IDs of chunks (a fixed random UUID).
_CHUNKS = uuid.UUID("8d3f6a2e-4b1c-4f7e-9a0d-6c5b2e1f7a93")


@dataclass(frozen=True)
class Stream:
    """A stream as its ends see it."""

    ksid: str
    link_id: Id
    master_sae_id: Id
    slave_sae_id: Id
    chunk_size: int
    ttl_seconds: int
    master_end: str
    slave_end: str
    closed: bool


def chunk_key_id(ksid: str, index: int) -> str:
    """The key ID of a stream's chunk."""
    return str(uuid.uuid5(_CHUNKS, f"{ksid}/{index}"))


def open_end(ksid: str, link_id: Id, master: Id, slave: Id, chunk_size: int, ttl_seconds: int,
             is_master: bool, master_open: bool = False) -> tuple[Stream, str]:
    """Open one end of a stream (made by the first end that opens it, with its chunk size and TTL): the stream and
    what the end became: OPEN, WAITING (a slave before its master), or None if the KSID is in use (that end is open
    already, the stream is closed, or it is another pair's). ``master_open``: the master's KME, another one, said
    that the master opened it."""
    with write_transaction() as session:
        statements.lock_name(session, f"stream/{ksid}")
        row = session.get(KeyStream, ksid)
        if row is None:
            row = KeyStream(ksid=ksid, link_id=link_id, master_sae_id=master, slave_sae_id=slave, chunk_size=chunk_size,
                            ttl_seconds=ttl_seconds, master_end=ABSENT, slave_end=ABSENT, closed=False,
                            created_at=clock.utc_now())
            session.add(row)
        elif row.closed or (row.master_sae_id, row.slave_sae_id) != (ids.number(master), ids.number(slave)):
            return _stream(row), None
        end = "master_end" if is_master else "slave_end"
        if getattr(row, end) == OPEN:
            return _stream(row), None
        if master_open:
            row.master_end = OPEN
        became = OPEN if is_master or row.master_end == OPEN else WAITING
        setattr(row, end, became)
        session.flush()
        events.record(session, f"Key stream {ksid}: the {'master' if is_master else 'slave'} SAE "
                               f"{master if is_master else slave} opened it"
                               + ("" if became == OPEN else ", waiting for its master"))
        return _stream(row), became


def link_rate_bps(link_id: Id) -> int:
    """The link's measured key rate (bit/s): the key files ingested in the last RATE_WINDOW_SECONDS, over that window
    or, if the first of them came later, over the time since it (at least a second); 0 if none came."""
    first, total = db.session.execute(
        select(func.min(KeyFile.ingested_at), func.coalesce(func.sum(KeyFile.length), 0))
        .where(KeyFile.link_id == link_id, KeyFile.ingested_at >= clock.utc_now(RATE_WINDOW_SECONDS))).one()
    db.session.commit()
    if first is None:
        return 0
    # PostgreSQL sums to a Decimal.
    return int(int(total) * 8 / max(clock.seconds_since(first), 1.0))


def find(ksid: str) -> Stream | None:
    """A stream by its KSID, or None (a read: no write turn for it)."""
    row = db.session.get(KeyStream, ksid)
    found = None if row is None else _stream(row)
    db.session.commit()
    return found


def read_chunk(stream: Stream, index: int, reader: Id, make: bool) -> bytes | None:
    """The chunk at ``index`` for ``reader`` (an end of the stream), made now if ``make`` (a stream of the zone)
    and neither end asked for it before; None if this end read it already, or it was erased (TTL, close), or is not
    here. NotEnoughKeys if the link cannot make it."""
    key_id = chunk_key_id(stream.ksid, index)
    reader_number = ids.number(reader)
    with write_transaction() as session:
        statements.lock_name(session, f"stream/{stream.ksid}")
        spent = handed_out.check(statements.driver(session))
        made = not make or session.get(StreamChunk, (stream.ksid, index)) is not None
        if not made:
            _make(session, stream, index, key_id)
        rows = statements.delivered_keys_and_slaves(statements.driver(session), [key_id])
        mine = [fetched for *_rest, slave, fetched in rows if slave == reader_number]
        if not mine or mine[0]:
            return None
        _key, link_id, master, material, _slave, _fetched = rows[0]
        chunk = at_rest.open_delivered(key_id, link_id, master, [row[4] for row in rows], material)
        if all(fetched for *_rest, slave, fetched in rows if slave != reader_number):
            erase_delivered(session, [key_id], {key_id: [row[4] for row in rows]})
        else:
            statements.mark_fetched(statements.driver(session), [key_id], reader)
        events.record(session, f"Key stream {stream.ksid}: chunk {index} read by SAE {reader}")
    if not made:
        handed_out.record(spent + pool_keys_per_key(stream.chunk_size * 8))
    return chunk


def _make(session, stream: Stream, index: int, key_id: str) -> None:
    needed = pool_keys_per_key(stream.chunk_size * 8)
    connection = statements.driver(session)
    taken = at_rest.open_pool(connection, stream.link_id, statements.take_pool_keys(connection, stream.link_id,
                                                                                    needed))
    if len(taken) < needed:
        raise NotEnoughKeys(f"not enough key material for a chunk of {stream.chunk_size} bytes")
    (key,) = build_keys([key_id], taken, stream.chunk_size * 8)
    store_delivered(session, stream.link_id, stream.master_sae_id, [stream.master_sae_id, stream.slave_sae_id],
                    [key], clock.utc_now())
    update_link(session, stream.link_id, removed=taken, added=[key.material], available=-needed, delivered=needed)
    session.add(StreamChunk(ksid=stream.ksid, idx=index, created_at=clock.utc_now()))


def claim_chunk(stream: Stream, index: int) -> str:
    """At the master's KME of a stream across two KMEs: CLAIMED if the caller is to make the chunk at ``index``
    (activate it at the slave's KME, then mark_made or drop_claim), MADE, or MAKING (another caller is)."""
    with write_transaction() as session:
        statements.lock_name(session, f"stream/{stream.ksid}")
        row = session.get(StreamChunk, (stream.ksid, index))
        if row is not None:
            return MADE if row.made else MAKING
        session.add(StreamChunk(ksid=stream.ksid, idx=index, created_at=clock.utc_now(), made=False))
        return CLAIMED


def chunk_state(ksid: str, index: int) -> str | None:
    """MADE, MAKING, or None if no one claimed the index (a read)."""
    row = db.session.get(StreamChunk, (ksid, index))
    state = None if row is None else MADE if row.made else MAKING
    db.session.commit()
    return state


def mark_made(ksid: str, index: int) -> None:
    """The claimed chunk was activated at the slave's KME and is stored here for the master; its TTL counts from
    now."""
    with write_transaction() as session:
        row = session.get(StreamChunk, (ksid, index))
        row.made, row.created_at = True, clock.utc_now()


def drop_claim(ksid: str, index: int) -> None:
    """The claimed chunk was provably not activated (no keys, the peer refused or was not reached): the index may
    be made again."""
    with write_transaction() as session:
        session.execute(delete(StreamChunk).where(StreamChunk.ksid == ksid, StreamChunk.idx == index,
                                                  StreamChunk.made.is_(False)))


def record_chunk(ksid: str, index: int, link_id: Id, master: Id, slave: Id, chunk_size: int,
                 ttl_seconds: int) -> None:
    """At the slave's KME: the master's KME activated the chunk at ``index`` here (its key is stored): recorded as
    made, and the stream as opened by its master (made here if the slave has not opened it yet). Idempotent."""
    with write_transaction() as session:
        statements.lock_name(session, f"stream/{ksid}")
        row = session.get(KeyStream, ksid)
        if row is None:
            session.add(KeyStream(ksid=ksid, link_id=link_id, master_sae_id=master, slave_sae_id=slave,
                                  chunk_size=chunk_size, ttl_seconds=ttl_seconds, master_end=OPEN, slave_end=ABSENT,
                                  closed=False, created_at=clock.utc_now()))
            session.flush()
        else:
            row.master_end = OPEN
        if session.get(StreamChunk, (ksid, index)) is None:
            session.add(StreamChunk(ksid=ksid, idx=index, created_at=clock.utc_now(), made=True))


def close(stream: Stream, by: str, tell_peer: bool = False) -> int:
    """Close a stream (``by``: who, for the event): its chunks that an end has not read are erased, never given;
    how many. ``tell_peer``: the stream's other KME is still to be told (closes_untold), in this transaction, so
    that no crash forgets it."""
    with write_transaction() as session:
        statements.lock_name(session, f"stream/{stream.ksid}")
        row = session.get(KeyStream, stream.ksid)
        row.closed = True
        row.close_untold = tell_peer
        indexes = session.scalars(select(StreamChunk.idx).where(StreamChunk.ksid == stream.ksid)).all()
        erased = erase_delivered(session, [chunk_key_id(stream.ksid, index) for index in indexes])
        events.record(session, f"Key stream {stream.ksid} closed by {by}: {erased} chunks not read by both "
                               "ends erased")
        return erased


def expire() -> int:
    """Erase the chunks older than their stream's TTL that an end has not read; how many.

    Each stream's chunks are looked at once, in the first round after their
    TTL (from its ``expired_before`` on): a long stream's old chunks are not
    read again at every round. A chunk counts from when it was made (a claim
    being activated at the slave's KME is not made yet), in a transaction
    that takes the database's write turn, as this does: none made before
    ``expired_before`` can commit after it.
    """
    with write_transaction() as session:
        erased = 0
        for row in session.scalars(select(KeyStream).where(KeyStream.closed.is_(False))):
            before = clock.utc_now(row.ttl_seconds)
            due = select(StreamChunk.idx).where(StreamChunk.ksid == row.ksid, StreamChunk.made.is_(True),
                                                StreamChunk.created_at < before)
            if row.expired_before is not None:
                due = due.where(StreamChunk.created_at >= row.expired_before)
            indexes = session.scalars(due).all()
            if indexes:
                row.expired_before = before
            gone = erase_delivered(session, [chunk_key_id(row.ksid, index) for index in indexes])
            if gone:
                events.record(session, f"Key stream {row.ksid}: {gone} chunks expired (TTL {row.ttl_seconds} s)")
            erased += gone
        return erased


def overview() -> list[tuple[Stream, int, int]]:
    """Every stream, newest first, with its chunks made and those still waiting for an end (kme-status and the
    debugging page's /streams: it reads every chunk's row)."""
    chunks = db.session.execute(select(StreamChunk.ksid, StreamChunk.idx)).all()
    waiting = set(statements.slaves_of(db.session, [chunk_key_id(ksid, index) for ksid, index in chunks])) \
        if chunks else set()
    made, left = Counter(), Counter()
    for ksid, index in chunks:
        made[ksid] += 1
        left[ksid] += chunk_key_id(ksid, index) in waiting
    rows = db.session.scalars(select(KeyStream).order_by(KeyStream.created_at.desc())).all()
    found = [(_stream(row), made[row.ksid], left[row.ksid]) for row in rows]
    db.session.commit()
    return found


def totals() -> tuple[dict[bool, int], int]:
    """Streams by ``closed``, and chunks made (metrics: two counts, at every scrape)."""
    by_state = dict(db.session.execute(select(KeyStream.closed, func.count()).group_by(KeyStream.closed)).all())
    made = db.session.scalar(select(func.count()).select_from(StreamChunk))
    db.session.commit()
    return {closed: by_state.get(closed, 0) for closed in (False, True)}, made


def closes_untold(limit: int = 50) -> list[Stream]:
    """Streams closed here whose other KME has not been told yet, oldest first."""
    found = [_stream(row) for row in db.session.scalars(
        select(KeyStream).where(KeyStream.close_untold).order_by(KeyStream.created_at).limit(limit))]
    db.session.commit()
    return found


def close_told(ksid: str) -> None:
    """The stream's other KME knows of its close."""
    with write_transaction() as session:
        row = session.get(KeyStream, ksid)
        if row is not None:
            row.close_untold = False


def forget_closed_before(before: str) -> None:
    """Forget streams closed and made before ``before`` (their chunks are erased already)."""
    with write_transaction() as session:
        session.execute(delete(KeyStream).where(KeyStream.closed, KeyStream.created_at < before))


def _stream(row: KeyStream) -> Stream:
    return Stream(row.ksid, row.link_id, row.master_sae_id, row.slave_sae_id, row.chunk_size, row.ttl_seconds,
                  row.master_end, row.slave_end, row.closed)
