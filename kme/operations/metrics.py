"""Prometheus metrics, correct under several gunicorn workers.

Counters of the web workers (requests, latencies, keys handed out, peer
failures) use prometheus-client's multiprocess mode: kme.create_app points
PROMETHEUS_MULTIPROC_DIR at the KME's metrics folder before this module is
imported. Pool figures are read from the database at scrape time, so every
process agrees on them.
"""
import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kme.config import KmeConfig
from kme.key_math import entropy
from kme.operations import health, status
from kme.storage.keystore import streams as stream_store

REQUESTS = Counter("kme_http_requests", "HTTP requests served", ["interface", "route", "method", "status"])
LATENCY = Histogram("kme_http_request_duration_seconds", "Time to answer an HTTP request", ["interface", "route"])
KEYS_DELIVERED = Counter("kme_keys_delivered", "Keys handed out to SAEs", ["link", "sae", "role"])
PEER_FAILURES = Counter("kme_peer_activation_failures", "Activations at a peer KME that failed",
                        ["peer", "outcome"])
RELAYS = Counter("kme_relays", "Relays through trusted nodes this KME started or passed on, once committed", ["role"])
INTEROP_KEYS = Counter("kme_interop_keys", "Keys that crossed the interop interface (ETSI GS QKD 020), by direction "
                       "and outcome, counted once per target SAE", ["direction", "status"])
RELAY_FAILURES = Counter("kme_relay_failures", "Relays that failed at a hop from this KME", ["next_kme", "reason"])


# Labelled children by label values: labels() takes a lock and builds its key on every call.
_children: dict[tuple, object] = {}


def child(metric, *values: str):
    """``metric.labels(*values)``, looked up once per process."""
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


def observe_request(interface: str, route: str, method: str, status_code: int, seconds: float) -> None:
    """Count one answered request and its duration."""
    child(REQUESTS, interface, route, method, str(status_code)).inc()
    child(LATENCY, interface, route).observe(seconds)


class _PoolCollector:
    """Pool figures of every link, read from the database at scrape time."""

    def __init__(self, config: KmeConfig):
        self.config = config

    def collect(self):
        pool = GaugeMetricFamily("kme_pool_keys", "256-bit keys in a link's pool", labels=["link", "state"])
        totals = CounterMetricFamily("kme_link_keys", "256-bit keys of a link, by fate", labels=["link", "kind"])
        waiting = GaugeMetricFamily("kme_keys_waiting", "Keys waiting for their slave SAEs", labels=["link"])
        files = CounterMetricFamily("kme_ingested_files", "Key files fully ingested", labels=["link"])
        bits = GaugeMetricFamily("kme_entropy_bits_per_byte", "Shannon entropy of a link's key material",
                                 labels=["link"])
        reachable = GaugeMetricFamily("kme_peer_reachable", "1 if the peer KME answered the last probe",
                                      labels=["peer"])
        duplicates = CounterMetricFamily("kme_duplicate_keys_refused",
                                         "Keys refused at ingestion: their material was ingested before",
                                         labels=["link"])
        directions = GaugeMetricFamily(
            "kme_direction_keys", "256-bit keys of one direction of a link (outbound: our masters; inbound: the "
            "peer's, as it last said): available, leased into it so far, in use", labels=["link", "direction", "state"])
        healthy = GaugeMetricFamily("kme_health_ok", "1 if the health check passes (see /healthz)",
                                    labels=["check"])
        streams = GaugeMetricFamily("kme_key_streams", "ETSI GS QKD 004 key streams, by state", labels=["state"])
        chunks = GaugeMetricFamily("kme_stream_chunks", "Chunks of the key streams made so far", labels=["state"])
        by_state, made = stream_store.totals()
        for state, closed in (("open", False), ("closed", True)):
            streams.add_metric([state], by_state[closed])
        chunks.add_metric(["made"], made)
        for check, outcome in health.check(self.config)[1]["checks"].items():
            healthy.add_metric([check], 1 if outcome == "ok" else 0)
        for link in status.links(self.config):
            name = str(link["link"])
            for state in ("available", "peer_held", "reserved", "unconfirmed"):
                pool.add_metric([name, state], link[state])
            for kind in ("ingested", "delivered", "discarded", "set_aside", "relayed"):
                totals.add_metric([name, kind], link[kind])
            for direction, figures in zip(("outbound", "inbound"), link["directions"]):
                for state in ("available", "leased", "in_use"):
                    if figures[state] is not None:
                        directions.add_metric([name, direction, state], figures[state])
            waiting.add_metric([name], link["waiting"])
            files.add_metric([name], link["files"])
            duplicates.add_metric([name], link["duplicates"])
            bits.add_metric([name], entropy.shannon(link["byte_counts"]))
            if link["peer"] is not None:
                reachable.add_metric([name], 1 if link["peer"]["reachable"] else 0)
        yield from (pool, totals, directions, waiting, files, bits, reachable, duplicates, healthy, streams, chunks)


def render(config: KmeConfig) -> bytes:
    """The Prometheus text exposition of this KME."""
    registry = CollectorRegistry()
    registry.register(_PoolCollector(config))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    # One process (in-memory database): its own counters are all there is.
    return generate_latest(REGISTRY) + generate_latest(registry)
