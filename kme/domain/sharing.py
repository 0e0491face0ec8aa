"""How the two KMEs of a link share its keys: progress exchange, leases, set-aside and pool samples.

- Progress: each KME tells the other, per file, how many leading positions
  it holds; only keys both hold are used (kme.storage.keystore.progress).
  The background worker exchanges progress every housekeeping interval and
  as soon as it ingested something; the peer answers with its own.
- Leases: confirmed keys belong to the arbiter's direction (lower KME ID)
  until it lends some. A master KME short of keys borrows a block from the
  peer in one round trip before it claims (kme.storage.keystore.leases),
  sized by its recent rate of leases. So both directions draw on the whole
  link, as demand decides.
- Set-aside: keys only one end holds, while the peer keeps answering
  without them for the grace period, are erased and counted.
"""
import logging
import time
import uuid

from kme import clock
from kme.config import KmeConfig, OtherKme
from kme.errors import NotEnoughKeys, PeerError, PeerOutcomeUnknown
from kme.peers.client import client_for
from kme.storage.db import meta
from kme.storage.keystore import common, leases, progress
from kme.storage.keystore.progress import Exchange, FileOffer
from kme.storage.meta_names import DATABASE_ID

log = logging.getLogger(__name__)

# Leases asked for one request at most, when each brings too few keys.
_BORROW_ATTEMPTS = 4

# Progress messages per exchange at most (each carries up to progress.PAGE files each way).
MAX_ROUNDS = 20


def _database_id() -> str:
    return meta(DATABASE_ID).decode()


def _offers(files: list[dict]) -> list[FileOffer]:
    return [FileOffer(item["file"], item["offered"], item["seq"]) for item in files]


def _wire(files: list[FileOffer]) -> list[dict]:
    return [{"file": item.name, "offered": item.offered, "seq": item.seq} for item in files]


def exchange_progress(config: KmeConfig, peer: OtherKme) -> None:
    """Exchange ingestion progress with ``peer`` until neither side has more to tell (PeerError if it fails)."""
    for _ in range(MAX_ROUNDS):
        push, known = progress.outgoing(peer.id, _database_id())
        answer = client_for(peer).exchange_progress({
            "database_ID": push.database_id, "known_database_ID": known, "since": push.seen, "after": push.after,
            "free": push.free, "files": _wire(push.files), "head": push.head})
        progress.answered(config.this_kme.id, peer.id, push.seen, Exchange(
            answer["database_ID"], _offers(answer["files"]), answer["free"], answer["seen"], head=answer["head"]))
        if len(push.files) < progress.PAGE and len(answer["files"]) < progress.PAGE:
            return


def answer_progress(config: KmeConfig, caller: OtherKme, data: dict) -> dict:
    """Apply the progress a peer KME sent; our own progress, as the answer."""
    database_id = _database_id()
    push = Exchange(data["database_ID"], _offers(data["files"]), data["free"], data["since"], data["after"],
                    data["head"])
    answer = progress.incoming(config.this_kme.id, caller.id, database_id, push, data["known_database_ID"])
    return {"database_ID": database_id, "seen": answer.seen, "free": answer.free, "files": _wire(answer.files),
            "head": answer.head}


def lend(config: KmeConfig, caller: OtherKme, data: dict) -> tuple[list[dict], int]:
    """Lend keys of our direction of the link to the calling KME's: (runs, our free keys left)."""
    return leases.give(caller.id, leases.LeaseRequest(data["lease_ID"], data["minimum"], data["wanted"]))


def lease_states(caller: OtherKme, lease_ids: list[str]) -> dict:
    """What we did with leases the calling KME gave us: {"database_ID", "leases": [{"lease_ID", "state"}]}."""
    found = leases.states(caller.id, lease_ids)
    return {"database_ID": _database_id(),
            "leases": [{"lease_ID": lease_id, "state": state} for lease_id, state in found.items()]}


def settle_given(peer: OtherKme) -> None:
    """Ask the peer about the leases we gave it lately that it has not acknowledged; take back those it never
    applied (PeerError if it did not answer: asked again next time)."""
    lease_ids = leases.unacknowledged(peer.id, clock.utc_now(leases.RECLAIM_WITHIN_SECONDS), progress.PAGE)
    if not lease_ids:
        return
    answer = client_for(peer).lease_states({"lease_IDs": lease_ids})
    asked = set(lease_ids)
    back = leases.settle_given(peer.id, {item["lease_ID"]: item["state"] for item in answer["leases"]
                                         if item["lease_ID"] in asked})
    if back:
        log.warning("KME %s never applied leases of ours: %d keys taken back", peer.id, back)


def borrow(peer: OtherKme, minimum: int, deadline: float | None = None) -> int:
    """Borrow at least ``minimum`` keys (else none) from the peer's direction, answered by ``deadline``
    (time.monotonic()); how many came.

    PeerError if the peer failed; after an unknown outcome the lease stays
    recorded and the background worker asks again with the same lease ID.
    """
    request = leases.ask(peer.id, str(uuid.uuid4()), minimum)
    return _ask(peer, request, deadline)


def _ask(peer: OtherKme, request: leases.LeaseRequest, deadline: float | None = None) -> int:
    try:
        answer = client_for(peer).lease({"lease_ID": request.lease_id, "minimum": request.minimum,
                                         "wanted": request.wanted}, deadline)
    except PeerError as exc:
        # Only a failure that proves the peer lent nothing lets us forget the lease.
        if not isinstance(exc, PeerOutcomeUnknown):
            leases.abandon(request.lease_id)
        raise
    return leases.receive(peer.id, request.lease_id, answer["runs"], answer["free"])


def settle_leases(config: KmeConfig, asked_before: str) -> None:
    """Ask again for the leases whose answer was lost, so the keys the peer lent are not stranded."""
    for link_id, request in leases.unanswered(asked_before):
        peer = config.other_kmes_by_id.get(config.kme_id(link_id))
        if peer is None:
            leases.abandon(request.lease_id)
            continue
        try:
            _ask(peer, request)
        except PeerError as exc:
            log.info("lease %s not settled yet: %s", request.lease_id, exc)


def housekeeping(config: KmeConfig, asked_before: str) -> None:
    """The link-sharing part of the background worker's periodic work, for every peer."""
    for peer in config.other_kmes:
        try:
            exchange_progress(config, peer)
            settle_given(peer)
        except PeerError as exc:
            # The peer probe already reports an unreachable peer; this would repeat it every interval.
            log.debug("progress or leases with KME %s not exchanged: %s", peer.id, exc)
        progress.set_aside_unmatched(config.this_kme.id, peer.id, config.this_kme.unmatched_key_grace_seconds)
    settle_leases(config, asked_before)
    common.sample_levels([peer.id for peer in config.other_kmes], time.time())


def reserve_borrowing(peer: OtherKme, reserve, needed: int, deadline: float):
    """``reserve()`` (of ``needed`` keys of our direction of the link with ``peer``); while our direction is
    short, borrow what is missing from the peer's and try again, every lease answered by ``deadline``.

    A lease is all or nothing, sized by what we miss; if keys arrive or go
    by another way meanwhile (another worker's lease or claim), what we miss
    is asked again. It stops when nothing changed since the
    last lease: the link has too few keys, and the reservation says so.
    """
    previous = None
    for _ in range(_BORROW_ATTEMPTS):
        try:
            return reserve()
        except NotEnoughKeys:
            short = needed - common.link_counts(peer.id).available
            if short == previous:
                break
            previous = short
            try:
                if short > 0:
                    borrow(peer, short, deadline)
            except PeerError as exc:
                log.warning("lease from KME %s: %s", peer.id, exc)
                raise
    return reserve()
