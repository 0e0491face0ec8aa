"""Errors: the KME's one vocabulary of domain errors, and their mapping to HTTP in one place.

Domain code raises the classes below with a message for the client; only
this module knows their HTTP status. Every error answer, Flask's own
404/405/413 included, is an ETSI GS QKD 014 Error body (clause 6.5).
Storage faults become 503 naming the cause; any other unexpected exception
is logged in full and answered with a generic 503 after the session is
rolled back: clients never see internals, nor text a peer KME sent.
"""
import logging

from flask import jsonify
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# Messages the standard prescribes byte for byte.
EXTENSION_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
KEYS_NOT_FOUND = "one or more keys specified are not found on KME"
SIZE_NOT_MULTIPLE_OF_8 = "size shall be a multiple of 8"
SERVER_ERROR = "key data access error"


class KmeError(Exception):
    """A domain error: an ETSI message for the client and optional details (list of objects)."""

    def __init__(self, message: str, details: list[dict] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict:
        body = {"message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(KmeError):
    """Malformed or out-of-range input; nothing changed."""


class NotAuthorized(KmeError):
    """The caller is not identified, or is not a slave SAE of a requested key."""


class KeysNotFound(KmeError):
    """One or more requested key IDs cannot be returned (the standard's message by default)."""

    def __init__(self, message: str = KEYS_NOT_FOUND):
        super().__init__(message)


class Forbidden(KmeError):
    """A peer KME acts outside its own link, master SAE or our slave SAEs."""


class ActivationConflict(KmeError):
    """A peer KME names keys this KME cannot activate, or an activation already settled otherwise."""


class NotEnoughKeys(KmeError):
    """The pool cannot serve the whole request; nothing was taken."""


class PeerFailure(KmeError):
    """A peer KME could not be reached, refused, or answered too late or wrongly (the message names it)."""


class RelayFailure(PeerFailure):
    """A relay did not reach its destinations; the message and ``relay_failure`` detail name the hop that failed.

    ``reason`` is one of REASONS: the KMEs before pass it on as it is, never a peer's own text.
    """

    REASONS = {
        "unreachable": "KME {next} could not be reached",
        "refused": "KME {next} refused it (HTTP {status})",
        "unknown": "KME {next} did not answer in time or answered wrongly; the keys are held back until settled",
        "no_keys": "not enough key material on the link",
        "no_route": "KME {at} has no route to KME {next}",
        "loop": "KME {next} is on the relay's path already (a routing loop)",
        "cancelled": "the relay was cancelled meanwhile",
    }

    def __init__(self, at: int, next_kme: int, reason: str, status: int | None = None):
        text = self.REASONS[reason].format(at=at, next=next_kme, status=status)
        super().__init__(f"relay failed at hop KME {at} -> KME {next_kme}: {text}",
                         [{"relay_failure": {"at_KME_ID": at, "next_KME_ID": next_kme, "reason": reason,
                                             "status": status}}])
        self.at, self.next_kme, self.reason, self.status = at, next_kme, reason, status


class StorageFailure(KmeError):
    """The database cannot be used (full, read-only, gone, replaced); the message names the cause."""

    def __init__(self, cause: str):
        super().__init__(f"{SERVER_ERROR}: {cause}")
        self.cause = cause


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

_HTTP_MESSAGES = {
    400: "the request is malformed",
    404: "no such method: see ETSI GS QKD 014 for the routes",
    405: "method not allowed for this route",
    413: "request body too large",
}


def http_status(error: KmeError) -> int:
    """The HTTP status of a domain error."""
    return next(status for kind, status in STATUS.items() if isinstance(error, kind))


def answer(status: int, body: dict):
    """A JSON response with ``status``."""
    response = jsonify(body)
    response.status_code = status
    return response


def init_app(app) -> None:
    """Register the handlers that turn every failure into an ETSI Error body."""
    from kme.storage import backends
    from kme.storage.db import db, reset_connections

    backend = backends.for_uri(app.config["SQLALCHEMY_DATABASE_URI"])

    @app.errorhandler(KmeError)
    def handle_kme_error(error: KmeError):
        db.session.rollback()
        return answer(http_status(error), error.body())

    @app.errorhandler(HTTPException)
    def handle_http_exception(error: HTTPException):
        db.session.rollback()
        code = error.code or 500
        message = _HTTP_MESSAGES.get(code, (error.description or error.name).rstrip("."))
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
