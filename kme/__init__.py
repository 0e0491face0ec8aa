"""A Key Management Entity (KME) for QKD networks, following ETSI GS QKD 014."""
import os

from flask import Flask

from kme.config import KmeConfig, load_config

# Key requests and key ID lists are small; anything bigger is refused with 413.
MAX_REQUEST_BYTES = 64 * 1024


def create_app(kme_config: KmeConfig | None = None, interface: str = "sae") -> Flask:
    """Build the WSGI app of one interface: "sae", "kme" (inter-KME), or "cli" for the flask commands.

    Cheap and without side effects (gunicorn calls it in every worker): the
    database is first touched by the first request or command.
    """
    from kme import cli, db, errors, kme_api, sae_api
    from kme.ingest import ingest_directories

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False
    cli.init_app(app)
    if kme_config is None and interface == "cli" and not os.environ.get("KME_CONFIG"):
        # gen-certs needs no configuration; the other commands say it is missing.
        return app
    config = kme_config or load_config()
    app.extensions["kme"] = config
    db.init_app(app, config.this_kme.database_uri)
    errors.init_app(app)
    if interface == "sae":
        app.register_blueprint(sae_api.bp)
    elif interface == "kme":
        app.register_blueprint(kme_api.bp)

    @app.before_request
    def prepare_database():
        # An in-memory database lives and dies with this process, which
        # therefore ingests the key files itself.
        if db.ensure_schema() and config.in_memory:
            ingest_directories(config)

    return app
