"""Leases: confirmed keys moved from one direction of a link to the other, so that demand decides the split.

The lender moves keys out of its own direction (OURS to PEERS) and commits
before it answers; the borrower takes them (to OURS) only once that answer
arrives. At every moment a key is free for one direction at most: for the
lender until its commit, for nobody while the answer travels, for the
borrower after. A lease asked is recorded before it is sent and answered
the same on every retry (the lender remembers what it gave), so a lost
answer is learnt again, never lent twice.

A lease the borrower never applies (its answer lost for good, or asked
with a lease ID the borrower never recorded) would strand the keys: the
lender asks the borrower, in the background, about every lease it gave in
the last RECLAIM_WITHIN_SECONDS and not yet acknowledged. "applied": the
lease is acknowledged; "pending": the borrower still asks for it (it will
apply the same runs); "unknown": the borrower holds no record of it, so it
never applied it and never will (it applies only answers to leases it
recorded before asking, under fresh random IDs, and keeps what it applied
for longer than the lender asks), and the lender takes the keys back into
its own direction. So a position is free for one direction at most, always.
"""
import json
import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from kme import clock, ids
from kme.errors import ActivationConflict
from kme.storage import events, statements
from kme.storage.db import db, write_transaction
from kme.storage.keystore.common import update_link
from kme.storage.models import OURS, PEERS, UNCONFIRMED, KeyFile, Lease, Link, PoolKey

ASKED = "asked"
GIVEN = "given"
# The borrower applied the lease; the lender learnt that it did.
APPLIED = "applied"
ACKNOWLEDGED = "acked"
# What a borrower says of a lease: applied, still asked for, or never recorded.
PENDING, UNKNOWN = "pending", "unknown"
# A lender asks about its leases of the last day only; a borrower remembers what it applied for two.
RECLAIM_WITHIN_SECONDS = 86400.0
REMEMBER_SECONDS = 2 * RECLAIM_WITHIN_SECONDS
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
        size = min(max(size, MIN_LEASE), MAX_LEASE)
        statements.set_link(session, link_id, lease_size=size, lease_at=now)
        request = LeaseRequest(lease_id, minimum, max(minimum, size))
        session.add(Lease(lease_id=lease_id, link_id=link_id, role=ASKED, created_at=clock.utc_now(),
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
            if known.link_id != ids.number(link_id) or known.role not in (GIVEN, ACKNOWLEDGED):
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
                          created_at=clock.utc_now()))
        if rows:
            events.record(session, f"Lent {len(rows)} keys to KME {link_id}'s direction of the link "
                                   f"(lease {request.lease_id})")
        return runs, free - len(rows)


def receive(link_id: int, lease_id: str, runs: list[dict], peer_free: int) -> int:
    """Take the keys the peer lent us into our direction; how many (0 if this lease was settled before)."""
    with write_transaction() as session:
        asked = session.get(Lease, lease_id)
        statements.set_link(session, link_id, peer_free=peer_free)
        if asked is None or asked.role != ASKED:
            return 0
        # Kept, as applied, for as long as the lender may ask about it.
        asked.role = APPLIED
        # An unconfirmed key here is one the peer confirmed first: it holds it, and lends it.
        moved = _to_ours(session, link_id, runs, (PEERS, UNCONFIRMED))
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
    """Drop the memory of old leases given or applied (kept only as long as a peer may ask again or ask about
    them)."""
    with write_transaction() as session:
        session.execute(delete(Lease).where(Lease.role.in_((GIVEN, ACKNOWLEDGED, APPLIED)),
                                            Lease.created_at < created_before))


def unacknowledged(link_id: int, given_after: str, limit: int) -> list[str]:
    """Leases given to the peer after the given time that it has not said it applied: their IDs."""
    lease_ids = db.session.scalars(select(Lease.lease_id).where(
        Lease.link_id == link_id, Lease.role == GIVEN, Lease.created_at > given_after)
        .order_by(Lease.created_at).limit(limit)).all()
    db.session.commit()
    return list(lease_ids)


def states(link_id: int, lease_ids: list[str]) -> dict[str, str]:
    """What this KME, as the borrower on ``link_id``, did with each lease: APPLIED, PENDING or UNKNOWN."""
    roles = dict(db.session.execute(select(Lease.lease_id, Lease.role).where(
        Lease.link_id == link_id, Lease.lease_id.in_(lease_ids), Lease.role.in_((ASKED, APPLIED)))).all())
    db.session.commit()
    return {lease_id: {ASKED: PENDING, APPLIED: APPLIED}.get(roles.get(lease_id), UNKNOWN) for lease_id in lease_ids}


def settle_given(link_id: int, answered: dict[str, str]) -> int:
    """Apply the borrower's word on leases we gave: acknowledged, or taken back; how many keys came back."""
    back = 0
    with write_transaction() as session:
        for lease_id, state in answered.items():
            given = session.get(Lease, lease_id)
            if given is None or given.link_id != ids.number(link_id) or given.role != GIVEN:
                continue
            if state == APPLIED:
                given.role = ACKNOWLEDGED
            elif state == UNKNOWN:
                back += _take_back(session, link_id, given)
    return back


def _take_back(session, link_id: int, given: Lease) -> int:
    """The borrower never applied ``given``: its keys still lent return to our direction."""
    runs = json.loads(given.parts)
    moved = _to_ours(session, link_id, runs, (PEERS,))[PEERS]
    update_link(session, link_id, available=moved, peer_held=-moved, lent=-sum(run["count"] for run in runs))
    session.delete(given)
    events.record(session, f"Lease {given.lease_id} to KME {link_id} taken back: KME {link_id} never applied it; "
                           f"{moved} keys back in our direction")
    return moved


def _to_ours(session, link_id: int, runs: list[dict], states: tuple[int, ...]) -> dict[int, int]:
    """Move the keys of the runs that are in ``states`` into our direction; how many moved from each state."""
    files = dict(session.execute(select(KeyFile.name, KeyFile.id).where(
        KeyFile.link_id == link_id, KeyFile.name.in_({run["file"] for run in runs}))).all()) if runs else {}
    moved = dict.fromkeys(states, 0)
    for run in runs:
        if run["file"] not in files:
            continue
        for state in states:
            moved[state] += session.execute(update(PoolKey).where(
                PoolKey.file_id == files[run["file"]], PoolKey.position >= run["first"],
                PoolKey.position < run["first"] + run["count"], PoolKey.state == state).values(state=OURS)).rowcount
    return moved


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
