"""GET /healthz on every interface: 200 when healthy, 503 naming what is wrong."""
from flask import Blueprint, current_app

from kme.operations import health

bp = Blueprint("health_api", __name__)


@bp.get("/healthz")
def healthz():
    """Database reachable, key directories readable, ingestion worker alive."""
    healthy, report = health.check(current_app.extensions["kme"])
    return report, 200 if healthy else 503
