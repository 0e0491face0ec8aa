"""The SAE path against the ceiling of its own web stack, and the abuse scenario (`make bench`).

Usage: .venv/bin/python bench/web_stack.py [seconds per measurement, default 3] [repetitions, default 5]
       [seconds of abuse, default 60; 0 leaves it out]
BENCH_CALLS="status;entropy" (names of the table, by prefix, separated by ";") measures only those calls.

Starts on 127.0.0.1 a KME pair (KME 1's SAE interface with the product's
defaults: 2 workers x 8 threads) and the ceilings: bench/ceiling_app.py
served by deploy/sae.py, the same gunicorn configuration, worker class, TLS
settings and client certificates. For each call, 8 client processes on raw
keep-alive TLS sockets (bench/load.py; a new TLS connection per request
where said) load ours, then its ceiling, interleaved, for each repetition. The row "string IDs" is
the call of the row above between two SAEs of KME 1 with string IDs
(alice-app and bob-app), and the line after the table compares the two. Prints one table:
medians over the repetitions of requests/s, p50 and p99 (ms), the ceiling's
figures and the ratio, the CPU time the servers' worker processes spent per
request (ours: KME 1's SAE interface, with KME 2's inter-KME interface for a
remote slave; the ceiling's: its workers, with the relay's) and beside it
the clients' ("client"). "bound" says whether the ceiling's servers, not its
clients, were the limit (they spent three times the clients' CPU per
request, in most repetitions: bench/load.py); the ratio is given only
against such a ceiling. The row
"Flask alone" is bench/ceiling_app.py's flask_app, the constant answer from a
Flask view, against the ceiling: what the framework itself costs. The rows
"keys in clear" are KME 1's zone as a KME of its own with encryption at rest
turned off (bench/clear_store.py), measured in the same interleaved run; the
lines after the table give the sealed calls' throughput as a share of theirs.
Then the
abuse scenario: 200 silent TCP connections, 200 half ClientHellos and 50
slowloris clients with valid certificates held for 60 s while one SAE calls
Get status ten times a second.
"""
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kme.config import DEFAULT_HOUSEKEEPING_SECONDS  # noqa: E402
from kme.operations.certs import generate_pki  # noqa: E402
from tests.conftest import PKI_LAYOUT  # noqa: E402
from tests.support import children  # noqa: E402
from tests.network import Network  # noqa: E402
from tests.support import PASSWORD, Pki, Process, free_port, load_json, wait_for_workers  # noqa: E402
from load import CLIENTS, load, pool  # noqa: E402
from load import session as sae_session  # noqa: E402

# The SAEs of KME 1 with string IDs, and the numbers of their certificates (tests/conftest.PKI_LAYOUT).
STRING_SAES = {"alice-app": 9, "bob-app": 10}
# number=128 at its rate takes about 10^6 keys over the 5 repetitions.
LOCAL_KEYS = 2_000_000
LINK_KEYS = 100_000


def _environment(threads: int = 8) -> dict:
    return {"KME_WORKERS": "2", "KME_THREADS": str(threads)}


def _gunicorn(config: Path, app: str, log: Path, extra_env: dict | None = None) -> Process:
    process = Process([sys.executable, "-m", "gunicorn", "-c", "deploy/sae.py", app], config, log,
                      {**_environment(), **(extra_env or {})})
    wait_for_workers(process, 2)
    return process


def _config_copy(source: Path, target: Path) -> tuple[Path, int]:
    """KME 1's configuration with another SAE port: the ceilings' listeners."""
    raw = load_json(source)
    port = free_port()
    raw["this_kme"]["saes_https_interface"]["listen_address"] = f"127.0.0.1:{port}"
    # The KEK generated beside KME 1's configuration, not a new one beside the copy.
    raw["this_kme"].setdefault("key_encryption_key", str(source.with_suffix(".kek")))
    target.write_text(json.dumps(raw))
    return target, port


class Stack:
    """The KME pair, the two ceilings, Flask alone and the KME in clear, started once; a start that fails
    stops what it started."""

    def __init__(self, folder: Path, pki: Pki):
        self.pki = pki
        # The product's background rounds (the tests' are 25 times as frequent, and cost a remote slave's peer
        # a tenth of its CPU).
        self.network = Network(folder / "kmes", pki, [(1, 2)], log_level="WARNING",
                               housekeeping_interval_seconds=DEFAULT_HOUSEKEEPING_SECONDS)
        # The servers started here besides the network's, stopped in reverse order.
        self.started: list[Process] = []
        try:
            self._start(folder, pki)
        except BaseException:
            self.stop()
            raise

    def _start(self, folder: Path, pki: Pki) -> None:
        kme1 = self.network[1]
        # Two SAEs with string IDs beside the integer ones: the same calls, the IDs of the standard.
        raw = load_json(kme1.config)
        raw["saes"] += [{"id": name, "kme_id": 1, "https_client_certificate_serial": pki.serials[f"sae{number}"]}
                        for name, number in STRING_SAES.items()]
        kme1.config.write_text(json.dumps(raw, indent=2))
        # The ingestion worker starts on empty folders (it says it watches once it ingested what it found), then
        # the files arrive whole, as a QKD device's would.
        kme1.start("ingest")
        staged = kme1.folder / ".local.cor.part"
        with open(staged, "wb") as handle:
            for _ in range(LOCAL_KEYS // 10_000):
                handle.write(os.urandom(32 * 10_000))
        os.rename(staged, kme1.folder / "keys" / "local.cor")
        self.network.write_link_file(1, 2, "link.cor", LINK_KEYS)
        kme1.processes["sae"] = _gunicorn(kme1.config, "wsgi:sae_app", kme1.folder / "sae.log")
        self.network[2].start("ingest", "kme")
        self.network.wait_for_link(1, 2, LINK_KEYS, timeout=300)
        kme1_ledger = kme1.ledger
        deadline = time.monotonic() + 300
        while kme1_ledger.link(1)["ingested"] < LOCAL_KEYS:
            if time.monotonic() > deadline:
                raise TimeoutError("the local keys were not ingested")
            time.sleep(0.2)
        self.ours = f"https://127.0.0.1:{kme1.port('saes_https_interface')}"
        ceiling_config, port = _config_copy(kme1.config, kme1.folder / "ceiling.json")
        self.ceiling = f"https://127.0.0.1:{port}"
        self.ceiling_process = self._keep(_gunicorn(ceiling_config, "bench.ceiling_app:app", folder / "ceiling.log"))
        relay_config, port = _config_copy(kme1.config, kme1.folder / "relay.json")
        self.relay = f"https://127.0.0.1:{port}"
        cert, key = pki.client(1, 1)
        self.relay_process = self._keep(_gunicorn(relay_config, "bench.ceiling_app:relay_app", folder / "relay.log", {
            "BENCH_RELAY_URL": f"{self.ceiling}/api/v1/keys/2/enc_keys", "BENCH_RELAY_CERT": cert,
            "BENCH_RELAY_KEY": key, "BENCH_RELAY_CA": pki.server_ca}))
        flask_config, port = _config_copy(kme1.config, kme1.folder / "flask.json")
        self.flask = f"https://127.0.0.1:{port}"
        self.flask_process = self._keep(_gunicorn(flask_config, "bench.ceiling_app:flask_app", folder / "flask.log"))
        self.clear, clear_process = _clear_kme(kme1.config, folder / "clear")
        self.clear_process = self._keep(clear_process)
        sae, peer = kme1.processes["sae"], self.network[2].processes["kme"]
        # Whose worker processes serve each kind of target (their CPU time is what the table shows).
        self.servers = {"ours": [sae], "remote": [sae, peer], "ceiling": [self.ceiling_process],
                        "relay": [self.relay_process, self.ceiling_process], "flask": [self.flask_process],
                        "clear": [self.clear_process]}

    def target(self, kind: str) -> str:
        return {"ours": self.ours, "remote": self.ours, "ceiling": self.ceiling, "relay": self.relay,
                "flask": self.flask, "clear": self.clear}[kind]

    def _keep(self, process: Process) -> Process:
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.started):
            process.stop()
        self.network.stop_all()


def _clear_kme(source: Path, folder: Path) -> tuple[str, Process]:
    """KME 1's zone as a KME of its own whose keys are stored in clear (bench/clear_store.py): the same build
    with encryption at rest off, its own database and LOCAL_KEYS keys, served like ours."""
    raw = load_json(source)
    folder.mkdir()
    (folder / "keys").mkdir()
    with open(folder / "keys" / "local.cor", "wb") as handle:
        for _ in range(LOCAL_KEYS // 10_000):
            handle.write(os.urandom(32 * 10_000))
    port = free_port()
    raw["this_kme"].update(sqlite_db_path=str(folder / "clear.db"), key_directory_to_watch=str(folder / "keys"),
                           key_encryption_key=str(folder / "clear.kek"))
    raw["this_kme"].pop("kmes_https_interface", None)
    raw["this_kme"]["saes_https_interface"]["listen_address"] = f"127.0.0.1:{port}"
    raw["other_kmes"], raw["saes"] = [], [sae for sae in raw["saes"] if sae["kme_id"] == raw["this_kme"]["id"]]
    config = folder / "clear.json"
    config.write_text(json.dumps(raw))
    (folder / "clear.kek").write_text(os.urandom(32).hex())
    (folder / "clear.kek").chmod(0o600)
    ingest = subprocess.run([sys.executable, str(ROOT / "bench" / "clear_store.py")], cwd=ROOT,
                            env=dict(os.environ, KME_CONFIG=str(config)), capture_output=True, text=True,
                            timeout=600)
    if ingest.returncode != 0:
        raise RuntimeError(f"the clear KME did not ingest its keys: {ingest.stderr}")
    return f"https://127.0.0.1:{port}", _gunicorn(config, "bench.clear_app:app", folder / "sae.log")


def _workers(masters: list[Process]) -> list[int]:
    """The pids of the worker processes of these gunicorn masters."""
    return [pid for master in masters for pid in children(master.proc.pid)]


def _load(clients, pki: Pki, base: str, path: str, seconds: float, servers: list[int], **options) -> dict:
    """CLIENTS clients at once on one server (bench/load.py)."""
    return load(clients, [{"pki": str(pki.folder), "base": base, "path": path, "seconds": seconds,
                           "sae": options.get("sae", 1), **options} for _ in range(CLIENTS)], servers)


CALLS = [
    # name, path, what serves it, its ceiling, options
    ("enc_keys, number=1", "/api/v1/keys/2/enc_keys", "ours", "ceiling", {}),
    ("enc_keys, number=1, string IDs", "/api/v1/keys/bob-app/enc_keys", "ours", "ceiling", {"sae": 9}),
    ("enc_keys, number=128", "/api/v1/keys/2/enc_keys?number=128", "ours", "ceiling", {}),
    ("dec_keys", "/api/v1/keys/1/dec_keys", "ours", "ceiling", {"sae": 2, "dec_keys": 2560}),
    ("status", "/api/v1/keys/2/status", "ours", "ceiling", {}),
    ("entropy", "/api/v1/keys/entropy/total", "ours", "ceiling", {}),
    ("enc_keys, remote slave", "/api/v1/keys/3/enc_keys", "remote", "relay", {}),
    ("enc_keys, new TLS connection each", "/api/v1/keys/2/enc_keys", "ours", "ceiling", {"new_connection": True}),
    ("Flask alone, constant answer", "/api/v1/keys/2/enc_keys", "flask", "ceiling", {}),
    # The same build with encryption at rest off (bench/clear_store.py): what sealing costs.
    ("enc_keys, number=1, keys in clear", "/api/v1/keys/2/enc_keys", "clear", "ceiling", {}),
    ("enc_keys, number=128, keys in clear", "/api/v1/keys/2/enc_keys?number=128", "clear", "ceiling", {}),
    ("dec_keys, keys in clear", "/api/v1/keys/1/dec_keys", "clear", "ceiling", {"sae": 2, "dec_keys": 2560}),
]
# Sealed call -> the same call in clear, for the cost of encryption at rest.
ENCRYPTION_PAIRS = {"enc_keys, number=1": "enc_keys, number=1, keys in clear",
                    "enc_keys, number=128": "enc_keys, number=128, keys in clear",
                    "dec_keys": "dec_keys, keys in clear"}


def _chosen_calls() -> list:
    wanted = [name.strip() for name in os.environ.get("BENCH_CALLS", "").split(";") if name.strip()]
    return [call for call in CALLS if not wanted or any(call[0].startswith(name) for name in wanted)]


def measure(stack: Stack, seconds: float, repetitions: int) -> None:
    calls = _chosen_calls()
    figures = {name: {"ours": [], "ceiling": []} for name, *_ in calls}
    workers = {kind: _workers(masters) for kind, masters in stack.servers.items()}
    with pool() as clients:
        for _ in range(repetitions):
            for name, path, served, ceiling, options in calls:
                figures[name]["ours"].append(_load(clients, stack.pki, stack.target(served), path, seconds,
                                                   workers[served], **options))
                figures[name]["ceiling"].append(_load(
                    clients, stack.pki, stack.target(ceiling), path.split("?")[0], seconds, workers[ceiling],
                    **{k: v for k, v in options.items() if k == "new_connection"}))
    print(f"{'call':<36} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'cpu ms':>6} {'client':>6} | {'ceiling':>8} "
          f"{'p99 ms':>7} {'cpu ms':>6} {'client':>6} {'bound':>5} | {'ratio':>5}  failures")
    keys = ("rate", "p50", "p99", "cpu", "client_cpu")
    rates = {}
    for name, *_ in calls:
        ours = {key: statistics.median(run[key] for run in figures[name]["ours"]) for key in keys}
        rates[name] = ours["rate"]
        top = {key: statistics.median(run[key] for run in figures[name]["ceiling"]) for key in keys}
        # The ratio counts only against a ceiling that its server, not the clients, limited in most runs.
        bound = sum(run["server_bound"] for run in figures[name]["ceiling"]) * 2 > len(figures[name]["ceiling"])
        failures = sum(run["failures"] for run in figures[name]["ours"])
        extra = f"  ({ours['rate'] * 128:,.0f} keys/s)" if "128" in name else ""
        ratio = f"{ours['rate'] / top['rate']:>5.2f}" if bound else "  n/a"
        print(f"{name:<36} {ours['rate']:>8.0f} {ours['p50']:>7.1f} {ours['p99']:>7.1f} {ours['cpu']:>6.3f} "
              f"{ours['client_cpu']:>6.3f} | {top['rate']:>8.0f} {top['p99']:>7.1f} {top['cpu']:>6.3f} "
              f"{top['client_cpu']:>6.3f} {'yes' if bound else 'NO':>5} | {ratio}  {failures}{extra}", flush=True)
    integer, named = "enc_keys, number=1", "enc_keys, number=1, string IDs"
    if integer in rates and named in rates:
        print(f"string IDs, {integer}: {rates[named]:.0f} req/s between alice-app and bob-app, {rates[integer]:.0f} "
              f"between SAEs 1 and 2, {rates[named] / rates[integer]:.2f} of the integer IDs' throughput", flush=True)
    for sealed, clear in ENCRYPTION_PAIRS.items():
        if sealed in rates and clear in rates:
            print(f"encryption at rest, {sealed}: {rates[sealed]:.0f} req/s sealed, {rates[clear]:.0f} in clear, "
                  f"{rates[sealed] / rates[clear]:.2f} of the clear throughput", flush=True)


def _client_hello_half() -> bytes:
    """The first half of a real TLS ClientHello."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    return hello[:len(hello) // 2]


def abuse(stack: Stack, seconds: float) -> None:
    """Silent, half-handshake and slowloris clients held for ``seconds``; a legitimate SAE's latencies."""
    port = int(stack.ours.rsplit(":", 1)[1])
    stop = threading.Event()
    half = _client_hello_half()
    cert, key = stack.pki.client(1, 1)

    def attacker(kind: str) -> None:
        while not stop.is_set():
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                if kind == "hello":
                    raw.sendall(half)
                elif kind == "slowloris":
                    context = ssl.create_default_context(cafile=stack.pki.server_ca)
                    context.load_cert_chain(cert, key)
                    raw = context.wrap_socket(raw, server_hostname="127.0.0.1")
                    for byte in b"GET /api/v1/keys/2/status HTTP/1.1\r\nHost: x\r\n":
                        if stop.wait(1):
                            break
                        raw.sendall(bytes([byte]))
                raw.settimeout(1)
                while not stop.is_set():
                    try:
                        if raw.recv(1) == b"":
                            break
                    except socket.timeout:
                        continue
                raw.close()
            except OSError:
                stop.wait(0.2)

    threads = [threading.Thread(target=attacker, args=(kind,), daemon=True)
               for kind, count in (("silent", 200), ("hello", 200), ("slowloris", 50)) for _ in range(count)]
    for thread in threads:
        thread.start()
    session = sae_session(str(stack.pki.folder), 1, 1)
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.perf_counter()
        try:
            if session.get(f"{stack.ours}/api/v1/keys/2/status", timeout=10).status_code != 200:
                failures += 1
        except requests.RequestException:
            failures += 1
            session.close()
        latencies.append(time.perf_counter() - began)
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(10)
    session.close()
    latencies.sort()
    print(f"abuse, {seconds:g} s of 200 silent + 200 half-ClientHello + 50 slowloris connections: legitimate "
          f"status p50 {statistics.median(latencies) * 1e3:.1f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.1f}"
          f" ms, worst {latencies[-1] * 1e3:.0f} ms, {failures} of {len(latencies)} calls failed", flush=True)


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    repetitions = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    abuse_seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    folder = Path(tempfile.mkdtemp(prefix="kme-bench-"))
    try:
        pki = Pki(folder / "pki", generate_pki(folder / "pki", PKI_LAYOUT, PASSWORD))
        stack = Stack(folder, pki)
        try:
            print(f"{CLIENTS} clients, {seconds:g} s per measurement, medians of {repetitions} interleaved "
                  f"repetitions, {os.cpu_count()} cores", flush=True)
            measure(stack, seconds, repetitions)
            if abuse_seconds > 0:
                abuse(stack, abuse_seconds)
        finally:
            stack.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
