"""GET /healthz on every interface: 200 when healthy, 503 naming what is wrong."""
from flask import Blueprint, current_app

from kme.operations import health

bp = Blueprint("health_api", __name__)


@bp.get("/healthz")
def healthz():
    """Database reachable, key directories readable, ingestion worker alive; encryption at rest."""
    config = current_app.extensions["kme"]
    healthy, report = health.check(config)
    report["encryption_at_rest"] = health.encryption(config, current_app.extensions["kme_kek"].source)
    return report, 200 if healthy else 503
