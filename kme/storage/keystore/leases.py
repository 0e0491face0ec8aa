"""Leases: confirmed keys moved from one direction of a link to the other, so that demand decides the split.

The lender moves keys out of its own direction (OURS to PEERS) and commits
before it answers; the borrower takes them (to OURS) only once that answer
arrives. At every moment a key is free for one direction at most: for the
lender until its commit, for nobody while the answer travels, for the
borrower after. A lease asked is recorded before it is sent and answered
the same on every retry (the lender remembers what it gave), so a lost
answer is learnt again, never lent twice.
"""
import json
import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from kme.domain.errors import ActivationConflict
from kme.operations import events
from kme.storage import statements
from kme.storage.db import db, write_transaction
from kme.storage.keystore.common import update_link
from kme.storage.models import OURS, PEERS, UNCONFIRMED, KeyFile, Lease, Link, PoolKey

ASKED = "asked"
GIVEN = "given"
# Lease sizes, in 256-bit keys: doubled when leases follow each other within
# FAST_SECONDS, halved after SLOW_SECONDS without one.
MIN_LEASE, MAX_LEASE = 32, 65536
FAST_SECONDS, SLOW_SECONDS = 30.0, 300.0


@dataclass(frozen=True)
class LeaseRequest:
    """A lease asked of the peer: at least ``minimum`` keys (else none), ``wanted`` if the peer can spare them."""

    lease_id: str
    minimum: int
    wanted: int


def ask(link_id: int, lease_id: str, minimum: int) -> LeaseRequest:
    """Record a lease we are about to ask for, sized by the recent rate of leases."""
    with write_transaction() as session:
        link = session.get(Link, link_id)
        now = time.time()
        size = link.lease_size or MIN_LEASE
        if now - link.lease_at < FAST_SECONDS:
            size *= 2
        elif now - link.lease_at > SLOW_SECONDS:
            size //= 2
        link.lease_size, link.lease_at = min(max(size, MIN_LEASE), MAX_LEASE), now
        request = LeaseRequest(lease_id, minimum, max(minimum, link.lease_size))
        session.add(Lease(lease_id=lease_id, link_id=link_id, role=ASKED, created_at=events.utc_now(),
                          parts=json.dumps({"minimum": request.minimum, "wanted": request.wanted})))
        return request


def give(link_id: int, request: LeaseRequest) -> tuple[list[dict], int]:
    """Lend keys of our direction to the peer's: (runs of positions, our free keys left).

    At least ``minimum`` or nothing; beyond it, up to ``wanted`` but never
    more than half of what we have, so that two busy directions do not pass
    keys back and forth. Asked again with the same lease ID, the same answer.
    """
    with write_transaction() as session:
        link = session.get(Link, link_id)
        known = session.get(Lease, request.lease_id)
        if known is not None:
            if known.link_id != link_id or known.role != GIVEN:
                raise ActivationConflict(f"lease {request.lease_id} belongs to another link")
            return json.loads(known.parts), link.available
        free = link.available
        count = min(free, max(request.minimum, min(request.wanted, free // 2)))
        if count < request.minimum:
            count = 0
        rows = statements.lend_pool_keys(session, link_id, count) if count else []
        runs = _runs(session, rows)
        update_link(session, link_id, available=-len(rows), peer_held=len(rows), lent=len(rows))
        session.add(Lease(lease_id=request.lease_id, link_id=link_id, role=GIVEN, parts=json.dumps(runs),
                          created_at=events.utc_now()))
        if rows:
            events.record(session, f"Lent {len(rows)} keys to KME {link_id}'s direction of the link "
                                   f"(lease {request.lease_id})")
        return runs, free - len(rows)


def receive(link_id: int, lease_id: str, runs: list[dict], peer_free: int) -> int:
    """Take the keys the peer lent us into our direction; how many (0 if this lease was settled before)."""
    with write_transaction() as session:
        asked = session.get(Lease, lease_id)
        link = session.get(Link, link_id)
        link.peer_free = peer_free
        if asked is None or asked.role != ASKED:
            return 0
        session.delete(asked)
        files = dict(session.execute(select(KeyFile.name, KeyFile.id).where(
            KeyFile.link_id == link_id, KeyFile.name.in_({run["file"] for run in runs}))).all())
        moved = {PEERS: 0, UNCONFIRMED: 0}
        for run in runs:
            if run["file"] not in files:
                continue
            for state in moved:
                # An unconfirmed key here is one the peer confirmed first: it holds it, and lends it.
                moved[state] += session.execute(update(PoolKey).where(
                    PoolKey.file_id == files[run["file"]], PoolKey.position >= run["first"],
                    PoolKey.position < run["first"] + run["count"], PoolKey.state == state).values(state=OURS)).rowcount
        total = moved[PEERS] + moved[UNCONFIRMED]
        update_link(session, link_id, available=total, peer_held=-moved[PEERS], unconfirmed=-moved[UNCONFIRMED],
                    borrowed=total)
        if total:
            events.record(session, f"Borrowed {total} keys from KME {link_id}'s direction of the link "
                                   f"(lease {lease_id})")
        return total


def abandon(lease_id: str) -> None:
    """Forget a lease the peer provably did not grant (refused, or never reached)."""
    with write_transaction() as session:
        session.execute(delete(Lease).where(Lease.lease_id == lease_id, Lease.role == ASKED))


def unanswered(asked_before: str) -> list[tuple[int, LeaseRequest]]:
    """Leases asked before the given time whose answer never arrived: (link, request), to ask again."""
    rows = db.session.scalars(select(Lease).where(Lease.role == ASKED, Lease.created_at < asked_before)).all()
    pending = [(row.link_id, LeaseRequest(row.lease_id, **json.loads(row.parts))) for row in rows]
    db.session.commit()
    return pending


def forget_given_before(created_before: str) -> None:
    """Drop the memory of old leases given (kept only as long as a peer may ask again)."""
    with write_transaction() as session:
        session.execute(delete(Lease).where(Lease.role == GIVEN, Lease.created_at < created_before))


def _runs(session, rows: list) -> list[dict]:
    """(file_id, position) rows as runs of consecutive positions: [{"file", "first", "count"}]."""
    names = dict(session.execute(select(KeyFile.id, KeyFile.name).where(
        KeyFile.id.in_({file_id for file_id, _position in rows}))).all()) if rows else {}
    runs: list[dict] = []
    for file_id, position in sorted(rows):
        last = runs[-1] if runs else None
        if last and last["file"] == names[file_id] and last["first"] + last["count"] == position:
            last["count"] += 1
        else:
            runs.append({"file": names[file_id], "first": position, "count": 1})
    return runs
