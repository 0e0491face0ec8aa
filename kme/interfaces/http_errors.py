"""Domain errors mapped to HTTP in one place, and every failure answered as an ETSI Error body.

Every error answer, Flask's own 404/405/413 included, is an ETSI GS QKD
014 Error body (clause 6.5). Storage faults become 503 naming the cause;
any other unexpected exception is logged in full and answered with a
generic 503 after the session is rolled back: clients never see
internals, nor text a peer KME sent.
"""
import logging
from http import HTTPStatus

from flask import current_app, jsonify
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException

from kme.errors import (
    SERVER_ERROR,
    ActivationConflict,
    BadRequest,
    Forbidden,
    KeysNotFound,
    KmeError,
    NotAuthorized,
    NotEnoughKeys,
    PeerFailure,
    StorageFailure,
)
from kme.storage import backends
from kme.storage.db import db, reset_connections

log = logging.getLogger(__name__)

# The one place where domain errors become HTTP statuses.
STATUS = {
    BadRequest: 400,
    KeysNotFound: 400,
    NotAuthorized: 401,
    Forbidden: 403,
    ActivationConflict: 409,
    NotEnoughKeys: 503,
    PeerFailure: 503,
    StorageFailure: 503,
}

HTTP_MESSAGES = {
    400: "the request is malformed",
    404: "no such method: see ETSI GS QKD 014 for the routes",
    405: "method not allowed for this route",
    413: "request body too large",
}
# Where the routes of an interface that does not serve ETSI GS QKD 014 are written.
_ROUTES_OF = {"kme": "this interface's OpenAPI document, /api/v1/openapi.json",
              "interop": "ETSI GS QKD 020 or this interface's OpenAPI document, /api/v1/openapi.json",
              "skip": "draft-cisco-skip or this interface's OpenAPI document, /api/v1/openapi.json",
              "debug": "docs/operations.md"}

# What each status answered above means to a client: the OpenAPI documents (kme.interfaces.openapi) say it.
MEANINGS = {
    400: "Bad request format (ETSI Error body)",
    401: "Unauthorized: no registered client certificate, or not a slave SAE of a requested key",
    403: "The calling KME acts outside its own link, master SAE or our slave SAEs",
    404: "No such route",
    405: "Method not allowed",
    409: "Keys not available at this KME, or the activation was settled otherwise",
    413: "Request body too large",
    503: "Error on the server side: not enough keys, a peer KME or the storage failed (named in the message)",
}


def http_status(error: KmeError) -> int:
    """The HTTP status of a domain error."""
    return next(status for kind, status in STATUS.items() if isinstance(error, kind))


def answer(status: int, body: dict):
    """A JSON response with ``status``: an ETSI Error body; on the interop interface (ETSI GS QKD 020), an RFC 7807
    problem that carries the draft's message data (``message``, ``details``) too."""
    problem = current_app.extensions.get("kme_interface") == "interop"
    if problem:
        body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
                "detail": body["message"], **body}
    response = jsonify(body)
    response.status_code = status
    if problem:
        response.mimetype = "application/problem+json"
    return response


def init_app(app) -> None:
    """Register the handlers that turn every failure into an ETSI Error body."""
    backend = backends.for_uri(app.config["SQLALCHEMY_DATABASE_URI"])

    @app.errorhandler(KmeError)
    def handle_kme_error(error: KmeError):
        db.session.rollback()
        return answer(http_status(error), error.body())

    @app.errorhandler(HTTPException)
    def handle_http_exception(error: HTTPException):
        db.session.rollback()
        code = error.code or 500
        message = HTTP_MESSAGES.get(code, (error.description or error.name).rstrip("."))
        routes = _ROUTES_OF.get(app.extensions.get("kme_interface"))
        if code == 404 and routes:
            message = f"no such route: see {routes}"
        response = answer(code, {"message": message})
        if code == 405 and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    def handle_storage_error(error: Exception):
        db.session.rollback()
        failure = StorageFailure(backend.failure_cause(error))
        log.error("storage failure: %s (%s)", failure.cause, getattr(error, "orig", error).__class__.__name__)
        # Pooled connections may be stuck in the failed state (a file opened
        # read-only stays read-only): new ones are opened once the fault clears.
        reset_connections()
        return answer(503, failure.body())

    # Through SQLAlchemy, or straight from the driver (the hot path's statements).
    for kind in (DBAPIError, *backend.DRIVER_ERRORS):
        app.register_error_handler(kind, handle_storage_error)

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception):
        db.session.rollback()
        log.exception("unexpected error while serving a request")
        return answer(503, {"message": SERVER_ERROR})
