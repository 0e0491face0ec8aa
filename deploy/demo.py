"""The demo behind `make run`: every KME configured in instance/, each with its processes.

For each instance/*.json5 it starts the ingestion worker and the SAE
interface, waits until they are up, prints the addresses and a copy-paste SAE
session, and stops every process it started (by pid) on Ctrl-C.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kme.config import ConfigError, load_config  # noqa: E402

STARTUP_SECONDS = 30


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


def _example(config) -> str:
    saes = [sae for sae in config.saes if sae.kme_id == config.this_kme.id]
    master, slave = saes[0].id, saes[1].id
    address = config.this_kme.saes_https_interface.listen_address
    kme = f"certs/kme{config.this_kme.id}"
    return f"""
  # SAE {master} asks KME {config.this_kme.id} for two 512-bit keys to share with SAE {slave}:
  curl --cacert certs/ca_servers.crt --cert {kme}/sae{master}.crt --key {kme}/sae{master}.key \\
       'https://{address}/api/v1/keys/{slave}/enc_keys?number=2&size=512'
  # SAE {slave} fetches the first of them by its key ID:
  curl --cacert certs/ca_servers.crt --cert {kme}/sae{slave}.crt --key {kme}/sae{slave}.key \\
       'https://{address}/api/v1/keys/{master}/dec_keys?key_ID=<key_ID from the first answer>'
"""


def main() -> int:
    configs = sorted((ROOT / "instance").glob("*.json5"))
    processes: list[subprocess.Popen] = []
    stop = []
    # Ctrl-C reaches the children too (same process group); each stops itself.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.append(True))
    try:
        loaded = []
        for path in configs:
            config = load_config(path)
            loaded.append(config)
            processes.append(_start([sys.executable, "-m", "flask", "ingest-keys", "--watch"], path))
            processes.append(_start([sys.executable, "-m", "gunicorn", "-c", "deploy/sae.py", "wsgi:sae_app"], path))
        for config in loaded:
            interface = config.this_kme.saes_https_interface
            _wait_for_port(interface.host, interface.port, processes)
        print("\nDemo KMEs are up:")
        for config in loaded:
            print(f"  KME {config.this_kme.id} ({config.this_kme.nickname}): SAE interface "
                  f"https://{config.this_kme.saes_https_interface.listen_address}")
        print(_example(loaded[0]))
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
