"""Health of a KME: database, key directories, background worker, peers.

The background worker (flask ingest-keys --watch) writes a heartbeat and the
peers' reachability; every interface's /healthz reads them.
"""
import os
import sqlite3
import time
from contextlib import closing

from sqlalchemy import select

from kme import events
from kme.config import KmeConfig
from kme.db import db, write_transaction
from kme.models import Heartbeat, PeerStatus

WORKER = "ingest-worker"


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
        row.reachable, row.checked_at, row.detail = reachable, events.utc_now(), detail[:256]
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
    path = config.this_kme.database_uri.removeprefix("sqlite:///")
    # A fresh read-only connection: a pooled one would still see a file that
    # was moved or deleted under it.
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as connection:
            connection.execute("SELECT peer_kme_id FROM links LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        return f"database {path}: {exc}"
    return None


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


def check(config: KmeConfig) -> tuple[bool, dict]:
    """(healthy, report): each check is "ok" or says what is wrong."""
    report = {}
    database = _database_problem(config)
    report["database"] = database or "ok"
    unreadable = [f"{path}" for path in config.key_directories().values()
                  if not (path.is_dir() and os.access(path, os.R_OK | os.X_OK))]
    report["key_directories"] = f"not readable: {', '.join(unreadable)}" if unreadable else "ok"
    report["ingestion_worker"] = "unknown (database unavailable)" if database else (_worker_problem(config) or "ok")
    healthy = all(value == "ok" for value in report.values())
    return healthy, {"status": "ok" if healthy else "unhealthy", "checks": report}
