"""Errors: one exception type carrying HTTP status, ETSI message and details.

Every error answer, Flask's own 404/405/413 included, is an ETSI GS QKD 014
Error body (clause 6.5). Unexpected exceptions are logged in full and answered
with a generic 503 after the session is rolled back: clients never see
internals.
"""
import logging

from flask import jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# Messages the standard prescribes byte for byte.
EXTENSION_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
KEYS_NOT_FOUND = "one or more keys specified are not found on KME"
SIZE_NOT_MULTIPLE_OF_8 = "size shall be a multiple of 8"
SERVER_ERROR = "key data access error"


class KmeError(Exception):
    """An error answer: HTTP status, ETSI message, optional details (list of objects)."""

    def __init__(self, status: int, message: str, details: list[dict] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details

    def body(self) -> dict:
        body = {"message": self.message}
        if self.details:
            body["details"] = self.details
        return body


def bad_request(message: str, details: list[dict] | None = None) -> KmeError:
    return KmeError(400, message, details)


def unauthorized(message: str) -> KmeError:
    return KmeError(401, message)


def unavailable(message: str) -> KmeError:
    return KmeError(503, message)


def _answer(error: KmeError):
    response = jsonify(error.body())
    response.status_code = error.status
    return response


def init_app(app) -> None:
    """Register the handlers that turn every failure into an ETSI Error body."""
    from kme.db import db

    @app.errorhandler(KmeError)
    def handle_kme_error(error: KmeError):
        db.session.rollback()
        return _answer(error)

    @app.errorhandler(HTTPException)
    def handle_http_exception(error: HTTPException):
        db.session.rollback()
        message = {
            404: "no such method: see ETSI GS QKD 014 for the routes",
            405: "method not allowed for this route",
            413: "request body too large",
        }.get(error.code, (error.description or error.name).rstrip("."))
        response = _answer(KmeError(error.code or 500, message))
        if error.code == 405 and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception):
        db.session.rollback()
        log.exception("unexpected error while serving a request")
        return _answer(unavailable(SERVER_ERROR))
