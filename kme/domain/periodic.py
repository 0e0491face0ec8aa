"""The KME's periodic work, each job with its own cadence.

One background worker of a KME runs it (kme.operations.watch: the worker
that holds the periodic lock), in two threads: the jobs on its own database,
and the jobs with its peers, which a peer that hangs may slow (each call
waits out its timeout) but never the database's jobs or the heartbeat.
``housekeeping_interval_seconds`` paces the work that moves keys (the
progress exchange, settling, releases, relays whose worker died, the
acknowledgements and stream closes the peers are owed); the rest
needs no more than one round every SLOW_SECONDS: probing the peers for the
debugging page, expiry (in seconds of ``key_expiry_seconds``), the end of a
key-encryption key's rotation.
"""
import time
from collections.abc import Callable
from dataclasses import dataclass

from kme import clock
from kme.config import KmeConfig
from kme.domain import interop, relay, sharing, streams
from kme.domain.activation import abandoned_before, settle_pending
from kme.operations import health
from kme.peers.client import client_for
from kme.storage import at_rest, events
from kme.storage.keystore import incoming
from kme.storage.keystore import interop as interop_store
from kme.storage.keystore import leases, local, relays
from kme.storage.keystore import streams as stream_store

# Seconds between two rounds of the jobs that move no key, at least.
SLOW_SECONDS = 2.0


@dataclass(frozen=True)
class Job:
    """A piece of periodic work: ``run(config)`` every ``seconds(config)``."""

    name: str
    run: Callable[[KmeConfig], object]
    seconds: Callable[[KmeConfig], float]


def _housekeeping(config: KmeConfig) -> float:
    return config.this_kme.housekeeping_interval_seconds


def _slow(config: KmeConfig) -> float:
    return max(config.this_kme.housekeeping_interval_seconds, SLOW_SECONDS)


def probe_peers(config: KmeConfig) -> None:
    """Record whether each peer KME's inter-KME interface answers (shown by the debugging page)."""
    for peer in config.other_kmes:
        health.record_peer(peer.id, *client_for(peer).probe())


def expire(config: KmeConfig) -> None:
    """Erase delivered keys nobody fetched in time, and forget what no peer can ask about any more."""
    expiry = config.this_kme.key_expiry_seconds
    while local.expire_delivered(clock.utc_now(expiry)):
        pass
    incoming.forget_before(clock.utc_now(max(expiry, 86400) * 2))
    leases.forget_given_before(clock.utc_now(leases.REMEMBER_SECONDS))
    interop_store.forget_sent_acks(clock.utc_now(interop_store.SENT_ACKS_KEPT_SECONDS))
    interop_store.forget_sent(clock.utc_now(interop_store.SENT_ACKS_KEPT_SECONDS))
    stream_store.expire()
    stream_store.forget_closed_before(clock.utc_now(max(expiry, 86400) * 2))
    events.prune()


# The link's keys at both ends: what the peers must hear first when keys were ingested.
SHARING = Job("link sharing", lambda config: sharing.housekeeping(config, abandoned_before(config)), _housekeeping)

DATABASE_JOBS = (
    Job("relays whose worker died", lambda config: relays.abandon(abandoned_before(config)), _housekeeping),
    Job("interop keys whose relay's worker died",
        lambda config: interop.fail_abandoned(config, abandoned_before(config)), _housekeeping),
    Job("the end of a key-encryption key's rotation", lambda _config: at_rest.end_rotation(expired_only=True),
        _slow),
    Job("expiry", expire, _slow),
)
PEER_JOBS = (
    Job("peer probes", probe_peers, _slow),
    SHARING,
    Job("settling", settle_pending, _housekeeping),
    Job("releases", lambda config: relay.send_releases(config, relays.releases_pending()), _housekeeping),
    Job("interop acknowledgements", interop.send_acks, _housekeeping),
    Job("key stream closes", streams.tell_closes, _housekeeping),
)


class Schedule:
    """When each of ``jobs`` is due next; all are due at first."""

    def __init__(self, jobs: tuple[Job, ...]):
        self.jobs = jobs
        self._due = {job.name: 0.0 for job in jobs}

    def run_due(self, config: KmeConfig, now_too: tuple[Job, ...] = ()) -> None:
        """Run, in order, the jobs that are due, and ``now_too`` whether due or not; each is due again its own
        seconds after it ran. An exception stops the round (the caller retries it); what ran stays done."""
        for job in self.jobs:
            if job in now_too or time.monotonic() >= self._due[job.name]:
                job.run(config)
                self._due[job.name] = time.monotonic() + job.seconds(config)
