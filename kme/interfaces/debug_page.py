"""The debugging web page (plain HTTP, loopback): live events, pool figures, health, metrics.

It shows IDs, counts, file names and where the key-encryption key comes from, never key material or a key.
"""
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, render_template, request

from kme.errors import Forbidden
from kme.operations import health, metrics, status
from kme.storage import events
from kme.storage.db import db

bp = Blueprint("debug_page", __name__)
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}

# Events the page and /messages show (the database keeps more).
SHOWN_EVENTS = 200


def _config():
    return current_app.extensions["kme"]


@bp.before_app_request
def only_for_this_host():
    """A page of another site that a browser reaches through DNS rebinding names that site in Host: refused."""
    configured = urlsplit(f"//{_config().this_kme.debugging_http_interface or ''}").hostname
    if _host_name(request.host) not in _LOOPBACK_NAMES | {configured}:
        raise Forbidden(f"the debugging page answers requests for this host only, not for {request.host[:64]!r}")


def _host_name(host: str) -> str | None:
    """The name in a Host header, without port or IPv6 brackets (None if it is not one)."""
    try:
        return urlsplit(f"//{host}").hostname
    except ValueError:
        return None


@bp.get("/")
def page():
    """The live page; static/debug.js refreshes it from /messages and /links."""
    config = _config()
    return render_template("debug.html", kme=config.this_kme,
                           encryption=health.encryption(config, current_app.extensions["kme_kek"].source))


@bp.get("/messages")
def messages():
    """The newest events, oldest first: [{"datetime", "message"}]."""
    nickname = _config().this_kme.nickname
    rows = events.recent(db.session, SHOWN_EVENTS)
    db.session.commit()
    return [{"datetime": row.created_at, "message": f"[{nickname}] {row.message}"} for row in rows]


@bp.get("/links")
def links():
    """Pool figures, directions, the last hour's pool levels and peer reachability of every link."""
    return [{key: value for key, value in link.items() if key != "byte_counts"} for link in status.links(_config())]


@bp.get("/streams")
def key_streams():
    """The ETSI GS QKD 004 key streams: SAEs, chunk size, ends, chunks made and waiting."""
    return status.streams(_config())


@bp.get("/metrics")
def prometheus_metrics():
    """Prometheus text format."""
    return Response(metrics.render(_config()), mimetype="text/plain; version=0.0.4; charset=utf-8")
