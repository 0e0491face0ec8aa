"""The benches' load generator: client processes on raw keep-alive TLS sockets, light enough that the server, not
the clients, is the limit, and the CPU each side spends per request.

A client speaks just enough HTTP/1.1: each request's bytes are built once,
each answer is read by its Content-Length (the KME and the ceilings always
send one). Keys for dec_keys are made with requests before the clock starts.
All clients and the parent meet at a barrier once their set-up is done, so
that the servers' CPU time is read around the measured seconds alone. A
measurement says whether it was server-bound: the servers spent at least
SERVER_BOUND times the clients' CPU per request. On 2 cores shared by both,
that gives the servers the larger part of the machine, and the clients
spend most of their time waiting for answers: a lighter client would not
make the server faster. (The CPU the servers use is not a test: gunicorn's
threaded workers leave part of the cores idle while their threads pass the
interpreter's lock, however fast the clients ask.)
"""
import multiprocessing
import os
import socket
import ssl
import statistics
import time
from pathlib import Path

import requests

CLIENTS = 8
# How many times the clients' CPU per request the servers must spend for a measurement to count as server-bound.
SERVER_BOUND = 3
_TICKS = os.sysconf("SC_CLK_TCK")
# The clients' and the parent's meeting point (a multiprocessing Barrier), made before the pool forks (pool()).
_start = None


def pool(context=None):
    """The pool of CLIENTS client processes (fork), sharing the start barrier with this process."""
    global _start
    context = context or multiprocessing.get_context("fork")
    _start = context.Barrier(CLIENTS + 1)
    return context.Pool(CLIENTS)


class RawClient:
    """One SAE's keep-alive HTTPS connection to one server."""

    def __init__(self, pki_folder: str, kme: int, sae: int, base: str):
        stem = Path(pki_folder) / f"kme{kme}" / f"sae{sae}"
        self.context = ssl.create_default_context(cafile=str(Path(pki_folder) / "ca_servers.crt"))
        self.context.load_cert_chain(str(stem.with_suffix(".crt")), str(stem.with_suffix(".key")))
        host, port = base.removeprefix("https://").rsplit(":", 1)
        self.address = (host, int(port))
        self.connection = self.answers = None

    def get(self, path: str) -> int:
        """GET ``path``; the answer's status (its body read and dropped)."""
        if self.connection is None:
            raw = socket.create_connection(self.address, timeout=30)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connection = self.context.wrap_socket(raw, server_hostname=self.address[0])
            self.answers = self.connection.makefile("rb")
        self.connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.address[0]}\r\n\r\n".encode())
        status = int(self.answers.readline().split(b" ", 2)[1])
        length, keep = 0, True
        while (line := self.answers.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        self.answers.read(length)
        if not keep:
            self.close()
        return status

    def close(self) -> None:
        if self.connection is not None:
            self.answers.close()
            self.connection.close()
        self.connection = self.answers = None


def session(pki_folder: str, kme: int, sae: int) -> requests.Session:
    """A requests session with an SAE's certificate (set-up and slow callers, not the load: it costs 1 ms of CPU
    per request)."""
    found = requests.Session()
    found.trust_env = False
    stem = Path(pki_folder) / f"kme{kme}" / f"sae{sae}"
    found.cert = (str(stem.with_suffix(".crt")), str(stem.with_suffix(".key")))
    found.verify = str(Path(pki_folder) / "ca_servers.crt")
    return found


def _key_ids(job: dict) -> list[str]:
    """Key IDs for dec_keys, made before the clock starts: SAE 1 asks, the job's SAE fetches."""
    master = session(job["pki"], 1, 1)
    found = []
    while len(found) < job["dec_keys"]:
        answer = master.get(f"{job['base']}/api/v1/keys/2/enc_keys?number=128", timeout=30)
        if answer.status_code != 200:
            raise RuntimeError(f"no keys for dec_keys: {answer.status_code} {answer.text}")
        found += [key["key_ID"] for key in answer.json()["keys"]]
    master.close()
    return found


def client(job: dict) -> dict:
    """One client process: its requests' latencies (s), failures, the seconds it ran and its own CPU seconds."""
    connection = RawClient(job["pki"], 1, job["sae"], job["base"])
    path = job["path"]
    paths = [f"{path}?key_ID={key_id}" for key_id in _key_ids(job)] if job.get("dec_keys") else [path]
    # Each key ID is fetched once; the other calls repeat their one path.
    limit = len(paths) if job.get("dec_keys") else float("inf")
    latencies, failures, index = [], 0, 0
    _start.wait()
    cpu, start = time.process_time(), time.perf_counter()
    deadline = start + job["seconds"]
    while time.perf_counter() < deadline and index < limit:
        began = time.perf_counter()
        try:
            if connection.get(paths[index % len(paths)]) != 200:
                failures += 1
        except (OSError, ValueError, IndexError):
            failures += 1
            connection.close()
        index += 1
        latencies.append(time.perf_counter() - began)
        if job.get("new_connection"):
            connection.close()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    connection.close()
    return {"latencies": latencies, "failures": failures, "seconds": elapsed, "cpu": cpu}


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of these processes, all their threads."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def load(clients, jobs: list[dict], servers: list[int], database: list[int] = ()) -> dict:
    """Run ``jobs`` (one per client: pki, base, path, seconds, sae, options) at once on the pool ``clients``:
    requests/s, p50 and p99 in ms, failures, the CPU ms per request of the servers, of the ``database``
    server's processes and of the clients, and whether the servers (with the database's) were the limit
    (``server_bound``: they spent SERVER_BOUND times the clients' CPU)."""
    pending = clients.map_async(client, jobs)
    _start.wait()
    server_cpu, database_cpu = cpu_seconds(servers), cpu_seconds(database)
    results = pending.get()
    server_cpu, database_cpu = cpu_seconds(servers) - server_cpu, cpu_seconds(database) - database_cpu
    latencies = sorted(latency for result in results for latency in result["latencies"])
    client_cpu = sum(result["cpu"] for result in results)
    return {"rate": sum(len(result["latencies"]) / result["seconds"] for result in results),
            "p50": statistics.median(latencies) * 1e3, "p99": latencies[int(len(latencies) * 0.99)] * 1e3,
            "failures": sum(result["failures"] for result in results),
            "cpu": server_cpu * 1e3 / len(latencies), "database_cpu": database_cpu * 1e3 / len(latencies),
            "client_cpu": client_cpu * 1e3 / len(latencies),
            "server_bound": server_cpu + database_cpu >= SERVER_BOUND * client_cpu}
