"""Which keys both KMEs of a link hold: ingestion progress exchanged per file, confirmation, set-aside.

A key of a link is used only once both KMEs hold it. Each KME offers, per
file, how many leading positions it holds (its ingestion progress, capped
once it set keys aside); a position below both offers is confirmed. A
confirmed key belongs to the arbiter's direction (the KME with the lower
ID) until a lease moves it (kme.storage.keystore.leases). Keys only this
KME holds, while the peer keeps answering without them for longer than the
grace period, are set aside: erased, counted, never used.

Offers are absolute values, so applying one twice changes nothing; the
change sequence of each side (``KeyFile.seq``) only saves resending what
the peer already has. Each message carries its sender's last change
number (``head``), so a cursor is never trusted past what its side made:
a peer that has more of our changes than we made, or whose last change is
before changes of it we had, tells that a database went back, and the
changes are exchanged again from the start.
"""
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update

from kme import ids
from kme.ids import Id
from kme.storage import at_rest, events, statements
from kme.storage.db import db, write_transaction
from kme.storage.keystore.common import update_link
from kme.storage.models import OURS, PEERS, UNCONFIRMED, KeyFile, Link, PoolKey

# Files per message of the exchange, each way.
PAGE = 1000


@dataclass(frozen=True)
class FileOffer:
    """How many leading positions of a file one KME holds, and the change that said so."""

    name: str
    offered: int
    seq: int


@dataclass(frozen=True)
class Exchange:
    """One side's message of the progress exchange (a push, or the answer to one)."""

    database_id: str
    files: list[FileOffer]
    free: int
    # Caller: our cursors (peer's changes we have, ours the peer acknowledged). Answer: ``seen`` only.
    seen: int
    after: int = 0
    # The sender's last change number (None from a KME that does not say).
    head: int | None = None


def is_arbiter(this_kme_id: Id, link_id: Id) -> bool:
    """Whether this KME arbitrates the link: it owns every confirmed key until it lends some. The arbiter is the
    KME whose ID comes first in the order both ends compute alike (kme.ids.order)."""
    return ids.order(this_kme_id) < ids.order(link_id)


def offer(row: KeyFile) -> int:
    """How many leading positions of the file this KME offers to use."""
    return row.next_position if row.offer_limit is None else min(row.next_position, row.offer_limit)


def head(session, link_id: int) -> int:
    """Our last change number of the link's files (the (link_id, seq) index makes it one search)."""
    return session.scalar(select(func.max(KeyFile.seq)).where(KeyFile.link_id == link_id)) or 0


def next_seq(session, link_id: int) -> int:
    """The next change number of the link's files."""
    return head(session, link_id) + 1


def confirm(session, this_kme_id: int, link_id: int, row: KeyFile) -> int:
    """Move the file's keys that both sides now hold out of UNCONFIRMED; how many moved."""
    upto = min(offer(row), row.peer_position)
    if upto <= row.decided:
        return 0
    arbiter = is_arbiter(this_kme_id, link_id)
    moved = session.execute(update(PoolKey).where(
        PoolKey.file_id == row.id, PoolKey.position >= row.decided, PoolKey.position < upto,
        PoolKey.state == UNCONFIRMED).values(state=OURS if arbiter else PEERS)).rowcount
    row.decided = upto
    update_link(session, link_id, unconfirmed=-moved, **{"available" if arbiter else "peer_held": moved})
    return moved


def outgoing(link_id: int, database_id: str) -> tuple[Exchange, str | None]:
    """Our push to the peer (our file changes it has not acknowledged, our cursors) and its database ID we know."""
    session = db.session
    link = session.get(Link, link_id)
    rows = session.scalars(select(KeyFile).where(KeyFile.link_id == link_id, KeyFile.seq > link.progress_sent)
                           .order_by(KeyFile.seq).limit(PAGE)).all()
    push = Exchange(database_id, [FileOffer(row.name, offer(row), row.seq) for row in rows], link.available,
                    link.progress_seen, link.progress_sent, head(session, link_id))
    known = link.peer_database
    session.commit()
    return push, known


def incoming(this_kme_id: int, link_id: int, database_id: str, push: Exchange,
             known_database: str | None) -> Exchange:
    """Apply a peer's push; answer with our changes after the peer's cursor (all if it knew another database)."""
    with write_transaction() as session:
        seen = _peer_database(session, link_id, push.database_id)
        ours = head(session, link_id)
        since = 0
        if known_database == database_id:
            # What the peer acknowledges, even below what it did before (it went back): resending is harmless.
            since = _acknowledged(session, link_id, push.seen, ours)
            statements.set_link(session, link_id, progress_sent=since)
        seen = _apply(session, this_kme_id, link_id, seen, push.files, push.free, contiguous=seen >= push.after)
        rows = session.scalars(select(KeyFile).where(KeyFile.link_id == link_id, KeyFile.seq > since)
                               .order_by(KeyFile.seq).limit(PAGE)).all()
        # Confirmation changed the counters: read them from the row.
        free = statements.link_row(session, link_id, ("available",))[0]
        return Exchange(database_id, [FileOffer(row.name, offer(row), row.seq) for row in rows], free, seen,
                        head=head(session, link_id))


def answered(this_kme_id: int, link_id: int, asked_since: int, answer: Exchange) -> None:
    """Apply the peer's answer to our push, which asked for its changes after ``asked_since``."""
    with write_transaction() as session:
        seen = _peer_database(session, link_id, answer.database_id)
        if answer.head is not None and answer.head < asked_since:
            # Its answer was made after every message that told us of those changes: not a crossing message.
            events.record(session, f"KME {link_id}'s last change ({answer.head}) is before changes of it we had "
                                   f"({asked_since}): its database went back (a restore or a failover?); "
                                   "its progress is learnt again")
            seen = 0
        _apply(session, this_kme_id, link_id, seen, answer.files, answer.free, contiguous=True)
        statements.set_link(session, link_id, progress_sent=_acknowledged(session, link_id, answer.seen,
                                                                          head(session, link_id)))


def _acknowledged(session, link_id: int, seen: int, ours: int) -> int:
    """The peer's cursor of our changes, ``seen``, unless it is past our last change ``ours``: then our database
    went back (or the peer is wrong), and every change of ours is sent again."""
    if seen <= ours:
        return seen
    events.record(session, f"KME {link_id} has our changes up to {seen}, past our last ({ours}): this database went "
                           "back (a restore or a failover?); all our files are announced again")
    return 0


def set_aside_unmatched(this_kme_id: int, link_id: int, grace_seconds: float) -> int:
    """Erase the keys only this KME holds, once the peer answered without them for ``grace_seconds``.

    Only an answering peer counts: a partition never sets keys aside; and
    only a file the peer reported, unchanged for as long. Our
    offer of each such file is capped where the peer stopped, so the peer
    sets its own surplus aside too and no position is ever confirmed at one
    end only. Returns how many keys were set aside.
    """
    with write_transaction() as session:
        link = session.get(Link, link_id)
        if not link.progress_at:
            return 0
        rows = session.scalars(select(KeyFile).where(
            KeyFile.link_id == link_id, KeyFile.complete, KeyFile.decided < KeyFile.next_position,
            KeyFile.changed_at < link.progress_at - grace_seconds,
            KeyFile.peer_reported_at <= link.progress_at - grace_seconds)).all()
        total = 0
        for row in rows:
            erased = set_aside(session, link_id, (UNCONFIRMED,), PoolKey.file_id == row.id,
                               PoolKey.position >= row.decided)
            row.offer_limit = row.decided if row.offer_limit is None else min(row.offer_limit, row.decided)
            row.decided = row.next_position
            row.seq = next_seq(session, link_id)
            total += erased
            events.record(session, f"Key file {row.name} on link {link_id}: {erased} keys that KME {link_id} "
                                   f"does not hold after {grace_seconds:g} s set aside "
                                   f"(positions from {row.offer_limit})")
        return total


# The states of keys that are free: of our direction, of the peer's, or not yet known to be held by both.
FREE = (OURS, PEERS, UNCONFIRMED)


def set_aside(session, link_id: int, states: tuple[int, ...], *where) -> int:
    """Erase the pool keys of ``link_id`` in ``states`` that match ``where`` (which names the link or a file of
    it: a file's keys are found by the (file_id, position) index), counted as set aside; how many."""
    erased = session.execute(delete(PoolKey).where(PoolKey.state.in_(states), *where)
                             .returning(PoolKey.state, PoolKey.file_id, PoolKey.position, PoolKey.material)).all()
    if erased:
        found = [state for state, *_ in erased]
        update_link(session, link_id, removed=at_rest.open_pool(session, link_id,
                                                                     [tuple(rest) for _, *rest in erased]),
                    available=-found.count(OURS), peer_held=-found.count(PEERS),
                    unconfirmed=-found.count(UNCONFIRMED), set_aside=len(erased))
    return len(erased)


def _withdrawn(session, link_id: int, row: KeyFile, offered: int) -> None:
    """The peer now holds fewer leading positions of a file than both ends had decided: it went back (restored
    from a backup, a retired file, keys it set aside). The free keys here from ``offered`` on can never be used
    at both ends: set them aside, and offer no more than the peer."""
    erased = set_aside(session, link_id, FREE, PoolKey.file_id == row.id, PoolKey.position >= offered)
    row.offer_limit = offered if row.offer_limit is None else min(row.offer_limit, offered)
    row.seq = next_seq(session, link_id)
    if erased:
        events.record(session, f"Key file {row.name} on link {link_id}: KME {link_id} holds only its first "
                               f"{offered} positions now; {erased} keys set aside here")


def _peer_database(session, link_id: int, database_id: str) -> int:
    """Our cursor of the peer's changes (``progress_seen``), after forgetting what a previous database of the
    peer said."""
    known, seen = statements.link_row(session, link_id, ("peer_database", "progress_seen"))
    if known != database_id:
        if known is not None:
            session.execute(update(KeyFile).where(KeyFile.link_id == link_id)
                            .values(peer_position=0, peer_reported_at=None))
            events.record(session, f"KME {link_id} has a new database: its ingestion progress is learnt again")
        statements.set_link(session, link_id, peer_database=database_id, progress_sent=0, progress_seen=0)
        seen = 0
    return seen


def _apply(session, this_kme_id: int, link_id: int, seen: int, files: list[FileOffer], free: int,
           contiguous: bool) -> int:
    """Apply the peer's file changes and free keys; our cursor of its changes (``seen``) after them."""
    now = time.time()
    if files:
        rows = {row.name: row for row in session.scalars(select(KeyFile).where(
            KeyFile.link_id == link_id, KeyFile.name.in_([item.name for item in files])))}
        for item in files:
            row = rows.get(item.name)
            if row is None:
                # Named by the peer before we saw it: our ingestion will find the row. Its change number tells
                # the peer that we hold none of it yet.
                row = KeyFile(link_id=link_id, name=item.name, next_position=0, complete=False, length=0,
                              duplicates=0, decided=0, seq=next_seq(session, link_id), changed_at=0.0)
                session.add(row)
                session.flush()
                # A push that names the file twice finds it the second time.
                rows[item.name] = row
            if row.peer_reported_at is None or item.offered != row.peer_position:
                row.peer_reported_at = now
            row.peer_position = item.offered
            if item.offered < row.decided:
                _withdrawn(session, link_id, row, item.offered)
            confirm(session, this_kme_id, link_id, row)
        if contiguous:
            seen = max(seen, max(item.seq for item in files))
    statements.set_link(session, link_id, progress_seen=seen, peer_free=free, progress_at=now)
    return seen
