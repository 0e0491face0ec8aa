"""What a process does before it builds an app: metrics in their multiprocess mode, and (in a gunicorn master)
the app's modules imported once for every worker to fork with."""
import importlib
import os
import stat
import sys

from kme.config import KmeConfig
from kme.errors import ConfigError

# What kme.create_app imports (and, through them, nearly all of kme): see preload().
_APP_MODULES = ("kme.interfaces.debug_page", "kme.interfaces.http_errors", "kme.interfaces.kme_api",
                "kme.interfaces.openapi", "kme.interfaces.sae_api", "kme.operations.cli", "kme.operations.ingest")


def share_metrics(config: KmeConfig) -> None:
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
    The list is kme.create_app's; one it misses only costs its worker the
    import.
    """
    share_metrics(kme_config)
    for name in _APP_MODULES:
        importlib.import_module(name)
