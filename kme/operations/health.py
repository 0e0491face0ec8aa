"""Health of a KME: database (writable, still the same file, not gone back in time), key directories, background
worker, peers.

The background worker (flask ingest-keys --watch) writes a heartbeat and the
peers' reachability; every interface's /healthz reads them.
"""
import os
import time

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from kme import clock
from kme.config import KekSource, KmeConfig
from kme.operations import key_folders
from kme.storage import statements
from kme.storage.db import db, meta, reset_connections, storage, write_transaction
from kme.storage.keystore import handed_out
from kme.storage.meta_names import CLEAR_POOL, DATA_KEY, DATABASE_ID
from kme.storage.models import Heartbeat, PeerStatus

WORKER = "ingest-worker"
PROBE_SECONDS = 1.0
_probe: dict = {"at": float("-inf"), "problem": None}


def beat(name: str = WORKER) -> None:
    """Record that the named background process is alive now."""
    with write_transaction() as session:
        row = session.get(Heartbeat, name)
        if row is None:
            session.add(Heartbeat(name=name, beat_at=time.time()))
        else:
            row.beat_at = time.time()


def record_peer(peer_kme_id: int, reachable: bool, detail: str) -> None:
    """Store the outcome of a reachability probe of a peer KME."""
    with write_transaction() as session:
        row = session.get(PeerStatus, peer_kme_id) or PeerStatus(peer_kme_id=peer_kme_id)
        row.reachable, row.checked_at, row.detail = reachable, clock.utc_now(), detail[:256]
        session.add(row)


def peer_statuses() -> dict[int, dict]:
    """The last probe of each peer: {peer ID: {"reachable", "checked_at", "detail"}}."""
    rows = db.session.scalars(select(PeerStatus)).all()
    statuses = {row.peer_kme_id: {"reachable": row.reachable, "checked_at": row.checked_at, "detail": row.detail}
                for row in rows}
    db.session.commit()
    return statuses


def _database_problem(config: KmeConfig) -> str | None:
    if config.in_memory:
        return None
    backend = storage().backend
    problem = backend.file_problem()
    if problem:
        return problem
    now = time.monotonic()
    # One write probe a second per process, however often /healthz is asked.
    if now - _probe["at"] >= PROBE_SECONDS:
        failure = backend.write_probe()
        _probe.update(at=now, problem=failure and f"writes fail: {backend.failure_cause(failure)} ({failure})")
    return _probe["problem"]


def _folder_problem(config: KmeConfig) -> str | None:
    problems = []
    try:
        database_id = None if config.in_memory else meta(DATABASE_ID)
    except DBAPIError:
        # The database check names that fault; the marks cannot be compared meanwhile.
        database_id = None
    for path in config.key_directories().values():
        if not (path.is_dir() and os.access(path, os.R_OK | os.X_OK)):
            problems.append(f"not readable: {path}")
            continue
        mark = key_folders.read_mark(path, config.this_kme.id)
        if database_id and mark is not None and mark != database_id.decode():
            problems.append(f"{path} belongs to another database ({mark}): see `flask adopt-key-folders`")
    return "; ".join(problems) or None


def _worker_problem(config: KmeConfig) -> str | None:
    if config.in_memory:
        return None
    row = db.session.get(Heartbeat, WORKER)
    db.session.commit()
    limit = 3 * config.this_kme.housekeeping_interval_seconds + 2
    if row is None:
        return "ingestion worker: never seen (is `flask ingest-keys --watch` running?)"
    silent = time.time() - row.beat_at
    if silent > limit:
        return f"ingestion worker: no heartbeat for {silent:.0f} s"
    return None


def encryption(config: KmeConfig, kek_source: KekSource) -> dict:
    """Encryption at rest as operators see it: on, where the key-encryption key comes from (never the key), and
    whether pool keys from before encryption at rest are still in clear."""
    keys = "sealed"
    if not config.in_memory:
        try:
            names = statements.meta_names(db.engine)
        except (DBAPIError, *storage().backend.DRIVER_ERRORS):
            names = None
        if names is None:
            keys = "unknown (database unavailable)"
        elif CLEAR_POOL in names:
            keys = "pool keys from before encryption at rest are still in clear: run flask encrypt-db"
        elif DATA_KEY not in names:
            keys = "sealed from the first use of the database on (it has no data key yet)"
    return {"on": True, "key_encryption_key": kek_source.describe(), "keys": keys}


def check(config: KmeConfig) -> tuple[bool, dict]:
    """(healthy, report): each check is "ok" or says what is wrong."""
    report = {}
    database = _database_problem(config)
    if not database:
        try:
            database = handed_out.problem()
        except (DBAPIError, *storage().backend.DRIVER_ERRORS) as exc:
            reset_connections()
            database = storage().backend.failure_cause(exc)
    report["database"] = database or "ok"
    report["key_directories"] = _folder_problem(config) or "ok"
    try:
        worker = "unknown (database unavailable)" if database else (_worker_problem(config) or "ok")
    except DBAPIError as exc:
        db.session.rollback()
        reset_connections()
        worker = f"unknown ({storage().backend.failure_cause(exc)})"
    report["ingestion_worker"] = worker
    healthy = all(value == "ok" for value in report.values())
    return healthy, {"status": "ok" if healthy else "unhealthy", "checks": report}
