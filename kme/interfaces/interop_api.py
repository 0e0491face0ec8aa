"""The interop interface (ETSI GS QKD 020 draft 0.4.1): another vendor's key management system in the same trusted
node, known by its client certificate (docs/interop.md).

This first part serves the versions and refuses every caller that is not a
configured foreign KMS; keys, acknowledgements and voids come next.
"""
from flask import Blueprint, current_app, g, request

from kme.config import ForeignKms
from kme.errors import NotAuthorized
from kme.interfaces.identity import client_serial

bp = Blueprint("interop_api", __name__, url_prefix="/kmapi")

# The API versions of the draft this KME serves.
VERSIONS = ("v1",)


def calling_foreign_kms() -> ForeignKms:
    """The foreign KMS whose verified client certificate made this request; 401 otherwise."""
    serial = client_serial(request.environ)
    if serial is None:
        raise NotAuthorized("a verified client certificate is required")
    foreign = current_app.extensions["kme"].foreign_kms_by_serial.get(serial)
    if foreign is None:
        raise NotAuthorized("the client certificate is not registered for a foreign KMS of this KME")
    g.caller = f"foreign KMS {foreign.id}"
    return foreign


@bp.get("/versions")
def versions():
    """The versions of the API this KME supports, newest last."""
    calling_foreign_kms()
    return {"versions": list(VERSIONS)}
