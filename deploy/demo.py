"""The demo behind `make run`: every KME configured in instance/, each with its processes.

For each instance/*.json5 (or each *.json5 of the folder given as argument:
instance/line3 is the three-KME line of `make run KMES=3`) it starts the
ingestion worker, the SAE interface, the inter-KME interface, the SKIP and
interop (ETSI GS QKD 020) interfaces and the ETSI GS QKD 004 server where
they are configured, and the debugging page, waits until they are up and the shipped key files are
ingested, prints the addresses and a copy-paste SAE session from the first
KME to the last, and stops every process it started (by pid) on Ctrl-C.
Each run starts afresh from the shipped key files.
"""
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kme import ids  # noqa: E402
from kme.config import load_config  # noqa: E402
from kme.database_uris import sqlite_path  # noqa: E402
from kme.errors import ConfigError  # noqa: E402
from kme.operations.certs import sae_stem  # noqa: E402
from kme.operations.key_folders import MARK_PREFIX  # noqa: E402
from kme.storage import handout_mark  # noqa: E402

STARTUP_SECONDS = 30
# The interfaces a configuration may add (this_kme.<name>_https_interface), as the demo names them.
_OPTIONAL = {"skip": "SKIP", "interop": "interop (ETSI GS QKD 020)"}


def _start(args: list[str], config: Path) -> subprocess.Popen:
    env = dict(os.environ, KME_CONFIG=str(config))
    return subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


def _wait_for_port(host: str, port: int, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            raise RuntimeError("a demo process exited during start-up")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{host}:{port} did not open within {STARTUP_SECONDS} s")


def _wait_for_ingestion(config, processes: list[subprocess.Popen]) -> None:
    """Wait until the KME has ingested every shipped key file and both ends of each link hold all of its keys.

    Only then does the README's first call find its keys: a key is used only
    once the peer KME said it holds it too.
    """
    database = sqlite_path(config.this_kme.database_uri)
    # The database names links by the numbers that store their KME IDs.
    expected = {ids.number(link): len(list(folder.glob("*.cor")))
                for link, folder in config.key_directories().items()}
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            raise RuntimeError("a demo process exited during start-up")
        try:
            with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)) as connection:
                done = dict(connection.execute(
                    "SELECT link_id, COUNT(*) FROM key_files WHERE complete GROUP BY link_id").fetchall())
                waiting = connection.execute("SELECT SUM(unconfirmed) FROM links").fetchone()[0]
            if all(done.get(link, 0) >= count for link, count in expected.items()) and waiting == 0:
                return
        except sqlite3.Error:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"KME {config.this_kme.id} did not ingest the shipped key files within {STARTUP_SECONDS} s")


def _example(master_kme, slave_kme) -> str:
    master = next(sae for sae in master_kme.saes if sae.kme_id == master_kme.this_kme.id)
    slave = next(sae for sae in slave_kme.saes if sae.kme_id == slave_kme.this_kme.id)
    here, there = master_kme.this_kme, slave_kme.this_kme
    # Each KME's SAE certificates sit beside its SAE CA, the server root one folder up; paths as from the folder
    # that holds certs/ (the repository root).
    certs_here, certs_there = (_from_top(kme.saes_https_interface.ca_client_cert_path.parent) for kme in (here, there))
    root_ca = certs_here.parent / "ca_servers.crt"
    via = master_kme.routes_by_destination.get(there.id)
    through = f" (relayed through trusted node KME {via})" if via is not None else ""
    return f"""
  # SAE {master.id} asks KME {here.id} for two 512-bit keys to share with SAE {slave.id} behind KME {there.id}{through}:
  curl --cacert {root_ca} --cert {certs_here}/{sae_stem(master.id)}.crt \\
       --key {certs_here}/{sae_stem(master.id)}.key \\
       'https://{here.saes_https_interface.listen_address}/api/v1/keys/{slave.id}/enc_keys?number=2&size=512'
  # SAE {slave.id} fetches the first of them from KME {there.id} by its key ID:
  curl --cacert {root_ca} --cert {certs_there}/{sae_stem(slave.id)}.crt \\
       --key {certs_there}/{sae_stem(slave.id)}.key \\
       'https://{there.saes_https_interface.listen_address}/api/v1/keys/{master.id}/dec_keys?key_ID=<key_ID>'
"""


def _from_top(path: Path) -> Path:
    top = next(folder for folder in path.parents if folder.name == "certs").parent
    return path.relative_to(top)


def _fresh_state(config) -> None:
    """Each demo starts from the shipped key files: no database, folder or hand-out marks or metrics left from an
    earlier run.

    Removing the marks is the demo's own decision that the shipped keys count
    as new (what `flask adopt-key-folders --existing new` does for an operator).
    """
    database = Path(sqlite_path(config.this_kme.database_uri))
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm"),
                 *(mark for directory in config.key_directories().values()
                   for mark in directory.glob(f"{MARK_PREFIX}*"))):
        path.unlink(missing_ok=True)
    shutil.rmtree(config.this_kme.key_directory_to_watch / handout_mark.MARK_NAME, ignore_errors=True)
    if config.this_kme.metrics_directory is not None:
        shutil.rmtree(config.this_kme.metrics_directory, ignore_errors=True)


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "instance"
    configs = sorted(folder.glob("*.json5"))
    processes: list[subprocess.Popen] = []
    stop = []
    # Ctrl-C reaches the children too (same process group); each stops itself.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.append(True))
    try:
        loaded = []
        for path in configs:
            config = load_config(path)
            _fresh_state(config)
            loaded.append(config)
            processes.append(_start([sys.executable, "-m", "flask", "ingest-keys", "--watch"], path))
            processes.append(_start([sys.executable, "-m", "gunicorn", "-c", "deploy/sae.py", "wsgi:sae_app"], path))
            processes.append(_start([sys.executable, "-m", "gunicorn", "-c", "deploy/kme.py", "wsgi:kme_app"], path))
            for name in _OPTIONAL:
                if getattr(config.this_kme, f"{name}_https_interface"):
                    processes.append(_start([sys.executable, "-m", "gunicorn", "-c", f"deploy/{name}.py",
                                             f"wsgi:{name}_app"], path))
            if config.this_kme.etsi004_interface:
                processes.append(_start([sys.executable, "-m", "flask", "serve-etsi004"], path))
            if config.this_kme.debugging_http_interface:
                processes.append(_start([sys.executable, "-m", "gunicorn", "-c", "deploy/debug.py", "wsgi:debug_app"],
                                        path))
        for config in loaded:
            for interface in (config.this_kme.saes_https_interface, config.this_kme.kmes_https_interface,
                              *(getattr(config.this_kme, f"{name}_https_interface") for name in _OPTIONAL),
                              config.this_kme.etsi004_interface):
                if interface is not None:
                    _wait_for_port(interface.host, interface.port, processes)
            _wait_for_ingestion(config, processes)
        print("\nDemo KMEs are up:")
        for config in loaded:
            optional = "".join(f"{_OPTIONAL[name]} interface https://{interface.listen_address}, "
                               for name in _OPTIONAL
                               if (interface := getattr(config.this_kme, f"{name}_https_interface")))
            streams = config.this_kme.etsi004_interface
            optional += f"ETSI GS QKD 004 server {streams.listen_address}, " if streams else ""
            print(f"  KME {config.this_kme.id} ({config.this_kme.nickname}): SAE interface "
                  f"https://{config.this_kme.saes_https_interface.listen_address}, inter-KME interface "
                  f"https://{config.this_kme.kmes_https_interface.listen_address}, {optional}"
                  f"debugging page http://{config.this_kme.debugging_http_interface}/")
        print(_example(loaded[0], loaded[-1]))
        print("Press Ctrl-C to stop.", flush=True)
        while not stop and all(process.poll() is None for process in processes):
            time.sleep(0.2)
        return 0 if stop else 1
    except (ConfigError, RuntimeError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        print("Demo stopped.")


if __name__ == "__main__":
    sys.exit(main())
