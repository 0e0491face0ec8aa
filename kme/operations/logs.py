"""Logging: one line per request and per event, as text or JSON lines.

Lines carry IDs, routes, statuses and durations, never key material: views
never log bodies, SQL parameters are hidden (kme.storage.db), and event messages name
keys by their IDs only.
"""
import json
import logging
import os
import sys
import time

from flask import g, request

from kme.text import printable

REQUEST_ID_HEADER = "X-Request-ID"
log = logging.getLogger("kme.request")
_REQUEST_ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class _PrintableText(logging.Formatter):
    """Text lines whose message cannot hold a line break or a terminal control sequence."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the request fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(level: str, json_lines: bool) -> None:
    """Send the kme loggers to stderr at ``level``; once per process."""
    logger = logging.getLogger("kme")
    logger.setLevel(level)
    if any(getattr(handler, "kme", False) for handler in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.kme = True
    formatter = JsonLines() if json_lines else _PrintableText("%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.propagate = False


def _request_id() -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    # A caller's ID is kept if it is short and plain, so it can be traced across KMEs.
    if 0 < len(given) <= 64 and _REQUEST_ID_CHARACTERS.issuperset(given):
        return given
    return os.urandom(16).hex()


# Routes whose successful requests are logged at DEBUG only.
QUIET_ROUTES = frozenset({"/api/v1/kme/progress", "/healthz"})


def init_app(app, interface: str, observe) -> None:
    """Log every request of ``app`` and hand its route, status and duration to ``observe``."""

    @app.before_request
    def start_clock():
        g.started = time.perf_counter()
        g.request_id = _request_id()

    @app.after_request
    def log_request(response):
        duration = time.perf_counter() - g.get("started", time.perf_counter())
        route = request.url_rule.rule if request.url_rule else "(no route)"
        request_id = g.get("request_id", "")
        response.headers[REQUEST_ID_HEADER] = request_id
        observe(interface, route, request.method, response.status_code, duration)
        # The peers' periodic progress exchanges would drown the log at INFO.
        level = logging.DEBUG if route in QUIET_ROUTES and response.status_code == 200 else logging.INFO
        if log.isEnabledFor(level):
            caller = g.get("caller", "-")
            fields = {"method": request.method, "route": route, "status": response.status_code, "caller": caller,
                      "duration_ms": round(duration * 1000, 1), "request_id": request_id}
            log.log(level, "%s %s %s %s %.1fms %s", request.method, route, response.status_code, caller,
                    duration * 1000, request_id, extra={"fields": fields})
        return response
