"""GET /healthz on every interface: 200 when healthy, 503 naming what is wrong.

Only a registered caller (an SAE of this KME on the SAE interface, a peer
KME on the inter-KME interface, anyone on the loopback debugging page) reads
the checks, which name folders, the database and the key-encryption key's
source; any other certificate of the CA gets the bare status.
"""
from flask import Blueprint, current_app, request

from kme.interfaces.identity import client_serial
from kme.operations import health

bp = Blueprint("health_api", __name__)


@bp.get("/healthz")
def healthz():
    """Database reachable, key directories readable, ingestion worker alive; encryption at rest."""
    config = current_app.extensions["kme"]
    healthy, report = health.check(config)
    if not _registered(config):
        return {"status": report["status"]}, 200 if healthy else 503
    report["encryption_at_rest"] = health.encryption(config, current_app.extensions["kme_kek"].source)
    return report, 200 if healthy else 503


def _registered(config) -> bool:
    """Whether the caller may read the details: a registered client of this interface."""
    interface = current_app.extensions["kme_interface"]
    if interface == "debug":
        return True
    serial = client_serial(request.environ)
    if serial is None:
        return False
    if interface == "sae":
        return serial in config.local_saes_by_serial
    return config.peer_by_serial(serial) is not None
