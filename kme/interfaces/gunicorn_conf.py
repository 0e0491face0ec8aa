"""Gunicorn settings for the KME's interfaces, built from KME_CONFIG.

deploy/sae.py, deploy/kme.py and deploy/debug.py are one-line gunicorn config
files over this module. It never builds the Flask app: workers create it after fork, so no
database connection is shared across processes; it imports the app's modules (kme.interfaces.startup.preload), so
that workers fork with them loaded. It checks the key-encryption key before any worker starts
(a read-only look at the database, closed at once).
"""
import ipaddress
import multiprocessing
import os
import ssl
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from kme import ids
from kme.config import HttpsInterface, load_config
from kme.errors import ConfigError
from kme.interfaces.startup import preload
from kme.storage import kek


def server_context(interface: HttpsInterface) -> ssl.SSLContext:
    """TLS 1.2 or higher, our server certificate, client certificates required from one CA, no renegotiation.

    Without renegotiation a connection keeps the client certificate of its
    handshake, which the identity middleware may therefore read once per
    connection.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(str(interface.server_cert_path), str(interface.server_key_path))
    context.load_verify_locations(cafile=str(interface.ca_client_cert_path))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        number = int(value) if value else default
    except ValueError:
        number = 0
    if number < 1:
        sys.exit(f"kme: {name}: not a positive integer: {value!r}")
    return number


def _worker_ready(worker) -> None:
    """Say when a worker has loaded the app, so that supervisors and tests know it can serve."""
    worker.log.info("kme: worker %s ready", worker.pid)


def _load():
    try:
        config = load_config()
    except ConfigError as exc:
        sys.exit(exc.for_operator())
    if config.in_memory:
        sys.exit("kme: this_kme.sqlite_db_path: ':memory:' cannot be shared by gunicorn workers; use a file")
    if config.this_kme.key_encryption_key.kind == "pkcs11":
        # A PKCS#11 library must not be loaded in a process that forks afterwards: the token is tried in a
        # process of its own, spawned; each worker opens it again after the fork.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            problem = pool.submit(_kek_problem_of_file, str(config.source)).result()
    else:
        problem = _kek_problem(config)
    if problem:
        sys.exit(f"kme: this_kme.key_encryption_key: {problem}")
    return config


def _kek_problem(config) -> str | None:
    """Why the configured KEK cannot be opened or does not open the database, or None (before any worker starts,
    so that gunicorn stops with one line instead of forking workers that fail)."""
    try:
        kek.open_at_start(config, lambda line: print(f"kme: warning: {line}", file=sys.stderr))
    except kek.KekError as exc:
        return str(exc)
    return None


def _kek_problem_of_file(config_path: str) -> str | None:
    """_kek_problem in a spawned process, which loads the configuration itself."""
    return _kek_problem(load_config(config_path))


def threads() -> int:
    """Threads per worker process (KME_THREADS, default 8); each needs its own database connection."""
    return _environment_int("KME_THREADS", 8)


def _bind(host: str, port: int) -> list[str]:
    return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]


def _common(config, short: str, port: int) -> dict:
    return {
        "workers": _environment_int("KME_WORKERS", 2),
        "threads": threads(),
        "keepalive": 5,
        "timeout": 60,
        "graceful_timeout": 5,
        "preload_app": False,
        "post_worker_init": _worker_ready,
        "proc_name": f"kme{config.this_kme.id}-{short}",
        # Two gunicorn masters on one host would otherwise share one control socket (a Unix socket's path stops at
        # 107 bytes: a long KME ID is named by its digest).
        "control_socket": os.path.join(tempfile.gettempdir(),
                                       f"kme{ids.in_file_name(config.this_kme.id, 24)}-{short}-{port}.ctl"),
    }


def settings(interface_name: str) -> dict:
    """The gunicorn settings of an HTTPS interface: ``saes_https_interface``, ``kmes_https_interface``,
    ``skip_https_interface`` or ``interop_https_interface``."""
    config = _load()
    preload(config)
    interface = getattr(config.this_kme, interface_name)
    if interface is None:
        sys.exit(f"kme: this_kme.{interface_name}: missing")
    short = interface_name.split("_")[0]
    if interface_name == "interop_https_interface" and not _in_node(interface.host) \
            and not config.this_kme.interop_https_allow_any_network:
        sys.exit(f"kme: this_kme.interop_https_interface: {interface.listen_address} is neither loopback nor a "
                 "private address; key values cross this interface, for the inside of one trusted node only (set "
                 "interop_https_allow_any_network to true to serve it there anyway)")
    if interface_name == "kmes_https_interface" and len(config.other_kmes) == 1 \
            and config.other_kmes[0].https_client_certificate_serial is None:
        print(f"kme: warning: other_kmes[0].https_client_certificate_serial is not set: every certificate of "
              f"the KME CA is taken for KME {config.other_kmes[0].id}", file=sys.stderr)
    return {
        **_common(config, short, interface.port),
        "bind": _bind(interface.host, interface.port),
        "worker_class": "kme.interfaces.gunicorn_worker.PeerCertificateWorker",
        "certfile": str(interface.server_cert_path),
        "keyfile": str(interface.server_key_path),
        "ca_certs": str(interface.ca_client_cert_path),
        "cert_reqs": ssl.CERT_REQUIRED,
        "ssl_context": _cached_context(interface),
    }


def _cached_context(interface: HttpsInterface):
    """gunicorn's ssl_context hook, building the context once per worker instead of at every connection.

    Built lazily, after the fork: each worker loads the certificate, key and
    CA files once (a restart picks up renewed files).
    """
    built: list[ssl.SSLContext] = []

    def context(_conf, _default) -> ssl.SSLContext:
        if not built:
            built.append(server_context(interface))
        return built[0]

    return context


def debug_settings() -> dict:
    """The gunicorn settings of the debugging page: plain HTTP, loopback unless the config allows more."""
    config = _load()
    preload(config)
    address = config.this_kme.debugging_http_interface
    if address is None:
        sys.exit("kme: this_kme.debugging_http_interface: missing (no debugging page is configured)")
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    if not _is_loopback(host) and not config.this_kme.debugging_http_allow_non_loopback:
        sys.exit(f"kme: this_kme.debugging_http_interface: {address} is not a loopback address; the page is plain "
                 "HTTP (set debugging_http_allow_non_loopback to true to serve it there anyway)")
    return {**_common(config, "debug", int(port)), "bind": _bind(host, int(port)), "worker_class": "gthread",
            "workers": 1}


def _in_node(host: str) -> bool:
    """Whether ``host`` is a loopback, private or link-local address: never a wildcard, never a public one."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return not address.is_unspecified and (address.is_loopback or address.is_private or address.is_link_local)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
