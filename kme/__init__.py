"""A Key Management Entity (KME) for QKD networks, following ETSI GS QKD 014."""
import logging
import os

from flask import Flask, request

from kme.config import KmeConfig, load_config
from kme.errors import ConfigError
from kme.interfaces.startup import share_metrics

# Key requests and key ID lists are small; anything bigger is refused with 413.
MAX_REQUEST_BYTES = 64 * 1024
INTERFACES = ("sae", "kme", "skip", "interop", "debug", "cli")


def create_app(kme_config: KmeConfig | None = None, interface: str = "sae") -> Flask:
    """Build the WSGI app of one interface: "sae", "kme" (inter-KME), "debug", or "cli" for the flask commands.

    Cheap and without side effects on the database (gunicorn calls it in every
    worker): the database is first touched by the first request or command.
    """
    if interface not in INTERFACES:
        raise ValueError(f"unknown interface {interface!r}")
    if kme_config is None and (interface != "cli" or os.environ.get("KME_CONFIG")):
        kme_config = load_config()
    if kme_config is not None:
        share_metrics(kme_config)

    from kme.interfaces import (
        debug_page,
        gunicorn_conf,
        health_api,
        http_errors,
        interop_api,
        kme_api,
        openapi,
        sae_api,
        skip_api,
    )
    from kme.operations import cli, logs, metrics
    from kme.operations.ingest import ingest_directories
    from kme.storage import db, kek, schema
    from kme.storage.kek import KekError

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False
    # "//api//v1//..." is a 404 in JSON, not a redirect with an HTML body.
    app.url_map.merge_slashes = False
    cli.init_app(app)
    if kme_config is None:
        # gen-certs needs no configuration; the other commands say it is missing.
        return app
    config = kme_config
    app.extensions["kme"] = config
    logs.configure(config.this_kme.log_level, config.this_kme.log_format == "json")
    try:
        app.extensions["kme_kek"] = kek.open_at_start(config, logging.getLogger("kme").warning,
                                                      check=interface != "cli")
    except KekError as exc:
        raise ConfigError(f"this_kme.key_encryption_key: {exc}") from None
    db.init_app(app, config.this_kme.database_uri, gunicorn_conf.threads())
    http_errors.init_app(app)
    app.extensions["kme_interface"] = interface
    blueprints = {"sae": [sae_api.bp, health_api.bp, openapi.bp], "kme": [kme_api.bp, health_api.bp, openapi.bp],
                  "skip": [skip_api.bp, health_api.bp, openapi.bp],
                  "interop": [interop_api.bp, health_api.bp, openapi.bp], "debug": [debug_page.bp, health_api.bp],
                  "cli": []}[interface]
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    if interface in ("sae", "kme", "skip", "interop"):
        logs.init_app(app, interface, metrics.observe_request)

    @app.before_request
    def prepare_database():
        # /healthz reports storage faults in its own body, on its own connection.
        if request.blueprint == health_api.bp.name and not config.in_memory:
            return
        db.check_database_file()
        # An in-memory database lives and dies with this process, which
        # therefore ingests the key files itself.
        if schema.ensure_schema() and config.in_memory:
            ingest_directories(config)

    return app
