"""A Key Management Entity (KME) for QKD networks, following ETSI GS QKD 014."""
import importlib
import logging
import os
import stat
import sys

from flask import Flask, request

from kme.config import KmeConfig, load_config
from kme.errors import ConfigError

# Key requests and key ID lists are small; anything bigger is refused with 413.
MAX_REQUEST_BYTES = 64 * 1024
INTERFACES = ("sae", "kme", "debug", "cli")
# What create_app imports (and, through them, nearly all of kme): see preload().
_APP_MODULES = ("kme.interfaces.debug_page", "kme.interfaces.http_errors", "kme.interfaces.kme_api",
                "kme.interfaces.openapi", "kme.interfaces.sae_api", "kme.operations.cli", "kme.operations.ingest")


def _share_metrics(config: KmeConfig) -> None:
    """Point prometheus-client at the KME's metrics folder (multiprocess mode).

    The mode is chosen when prometheus_client is first imported, so this runs
    before any module that imports it; a process that already has it keeps
    its single-process mode.
    """
    if config.this_kme.metrics_directory is None or "prometheus_client" in sys.modules:
        return
    _own_folder(config.this_kme.metrics_directory)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(config.this_kme.metrics_directory)


def _own_folder(folder) -> None:
    """Make the metrics folder owner-only, or check that it is this user's and that nobody else may write it.

    prometheus-client memory-maps every file there and adds them up: another
    user's folder (in the shared /dev/shm) could feed the KME's metrics, or
    stand in for it before it starts.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"this_kme.metrics_directory: {folder} cannot be created ({exc.strerror})") from None
    found = os.lstat(folder)
    if not stat.S_ISDIR(found.st_mode):
        raise ConfigError(f"this_kme.metrics_directory: {folder} is not a folder (a link, or a file)")
    if found.st_uid != os.geteuid():
        raise ConfigError(f"this_kme.metrics_directory: {folder} belongs to uid {found.st_uid}, not to this KME "
                          f"(uid {os.geteuid()}): remove it, or name another folder")
    if found.st_mode & 0o022:
        raise ConfigError(f"this_kme.metrics_directory: {folder} may be written by other users "
                          f"(mode {stat.S_IMODE(found.st_mode):o}): chmod go-w it")


def preload(kme_config: KmeConfig) -> None:
    """Import the modules of create_app's apps without building one, metrics in their mode first.

    A gunicorn master calls this before it forks: each worker then starts
    with them loaded, where importing them again was most of its start
    (0.7 s of CPU). Nothing is opened here: no database, thread or token.
    The list is create_app's, below; one it misses only costs its worker
    the import.
    """
    _share_metrics(kme_config)
    for name in _APP_MODULES:
        importlib.import_module(name)


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
        _share_metrics(kme_config)

    from flask_migrate import Migrate

    from kme.interfaces import debug_page, gunicorn_conf, health_api, http_errors, kme_api, openapi, sae_api
    from kme.operations import cli, logs, metrics
    from kme.operations.ingest import ingest_directories
    from kme.storage import db, kek, migrations
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
    if interface == "cli":
        # `flask db upgrade` and the other schema commands (kme.storage.migrations).
        Migrate(app, db.db, directory=str(migrations.DIRECTORY))
    http_errors.init_app(app)
    app.extensions["kme_interface"] = interface
    blueprints = {"sae": [sae_api.bp, health_api.bp, openapi.bp], "kme": [kme_api.bp, health_api.bp, openapi.bp],
                  "debug": [debug_page.bp, health_api.bp], "cli": []}[interface]
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    if interface in ("sae", "kme"):
        logs.init_app(app, interface, metrics.observe_request)

    @app.before_request
    def prepare_database():
        # /healthz reports storage faults in its own body, on its own connection.
        if request.blueprint == health_api.bp.name and not config.in_memory:
            return
        db.check_database_file()
        # An in-memory database lives and dies with this process, which
        # therefore ingests the key files itself.
        if db.ensure_schema() and config.in_memory:
            ingest_directories(config)

    return app
