"""A network of real KMEs on 127.0.0.1 for tests: configs, link key files, processes."""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kme.clock import utc_now
from kme.config import parse_config
from kme.peers.client import PeerClient
from tests.support import (
    Ledger,
    Pki,
    Process,
    free_port,
    load_json,
    sae_session,
    start_debug_page,
    start_etsi004_server,
    start_ingest_worker,
    start_interop_interface,
    start_kme_interface,
    start_sae_interface,
    start_skip_interface,
    wait_until,
    write_config,
)

# Which SAEs each KME serves in test networks (see tests/conftest.PKI_LAYOUT).
SAES = {1: (1, 2), 2: (3, 4), 3: (5,), 4: (6,), 5: (7,), 6: (8,)}


def line_routes(ids: list[int]) -> dict[int, dict[int, int]]:
    """Static routes of a line of KMEs in this order: towards each KME that is not a neighbour, the next one on
    its side."""
    return {kme: {other: ids[i + 1] if j > i else ids[i - 1] for j, other in enumerate(ids) if abs(i - j) > 1}
            for i, kme in enumerate(ids)}


class Kme:
    """One KME of a test network: its folder, configuration and processes. ``id`` is the test's number of the KME
    (its certificates' names), ``name`` its ID as configured."""

    def __init__(self, network: "Network", kme_id: int, folder: Path, config: Path):
        self.network, self.id, self.folder, self.config = network, kme_id, folder, config
        self.name = network.kme_names.get(kme_id, kme_id)
        self.processes: dict[str, Process] = {}
        self.ledger = Ledger(folder / "kme.db")

    def port(self, interface: str) -> int:
        return int(load_json(self.config)["this_kme"][interface]["listen_address"].rsplit(":", 1)[1])

    def url(self) -> str:
        return f"https://127.0.0.1:{self.port('saes_https_interface')}/api/v1"

    def debug_url(self) -> str:
        return "http://" + load_json(self.config)["this_kme"]["debugging_http_interface"]

    def sae(self, sae_id: int):
        return sae_session(self.network.pki, self.id, sae_id)

    def link_folder(self, peer: int) -> Path:
        return self.folder / ("keys" if peer == self.id else f"keys-{peer}")

    def skip_url(self) -> str:
        return f"https://127.0.0.1:{self.port('skip_https_interface')}"

    def start(self, *names: str) -> None:
        this_kme = load_json(self.config)["this_kme"]
        optional = [name for name in ("skip", "interop") if f"{name}_https_interface" in this_kme]
        optional += ["etsi004"] * ("etsi004_interface" in this_kme)
        for name in names or ("ingest", "sae", "kme", *optional):
            log = self.folder / f"{name}.log"
            if name == "ingest":
                self.processes[name] = start_ingest_worker(self.config, log)
            elif name == "sae":
                self.processes[name] = start_sae_interface(self.config, log, workers=self.network.workers)
            elif name == "skip":
                self.processes[name] = start_skip_interface(self.config, log, workers=self.network.workers)
            elif name == "interop":
                self.processes[name] = start_interop_interface(self.config, log, workers=self.network.workers)
            elif name == "kme":
                self.processes[name] = start_kme_interface(self.config, log, workers=self.network.workers)
            elif name == "etsi004":
                self.processes[name] = start_etsi004_server(self.config, log)
            else:
                self.processes[name] = start_debug_page(self.config, log)

    def stop(self, *names: str) -> None:
        for name in names or list(self.processes):
            process = self.processes.pop(name, None)
            if process:
                process.stop()


class Network:
    """KMEs linked pairwise; every process is stopped by stop_all()."""

    def __init__(self, folder: Path, pki: Pki, links: list[tuple[int, int]],
                 routes: dict[int, dict[int, int]] | None = None, workers: int = 2, kme_names: dict | None = None,
                 sae_names: dict | None = None, skip: bool = False, etsi004: bool = False,
                 housekeeping_interval_seconds: float = 0.2, **this_kme_extra):
        """``routes``: per KME, destination KME -> next hop, for KMEs it has no link with; ``workers``: gunicorn
        workers of each interface (networks of many KMEs start faster with one); ``kme_names``, ``sae_names``:
        the IDs that the configurations give KMEs and SAEs instead of their numbers (string IDs); ``skip``: each
        KME serves SKIP too, with its SAE interface's certificates; ``etsi004``: each KME serves ETSI GS QKD 004
        likewise; ``housekeeping_interval_seconds``: short, so that tests need not wait for the background's
        rounds (the benches give the product's default)."""
        self.pki = pki
        self.kme_names, self.sae_names = kme_names or {}, sae_names or {}
        self.workers = workers
        self.json_logs = this_kme_extra.get("log_format") == "json"
        ids = sorted({kme for link in links for kme in link})
        ports = {kme: free_port() for kme in ids}
        self.kmes: dict[int, Kme] = {}
        for kme_id in ids:
            peers = [b if a == kme_id else a for a, b in links if kme_id in (a, b)]
            other_kmes = [{
                "id": peer,
                "key_directory_to_watch": f"keys-{peer}",
                "inter_kme_bind_address": f"127.0.0.1:{ports[peer]}",
                "ignore_system_proxy_settings": True,
                "server_ca_cert_path": pki.server_ca,
                "https_client_authentication_certificate": str(pki.folder / f"kme{kme_id}" /
                                                               f"kme{kme_id}-to-kme{peer}.pfx"),
                "https_client_authentication_certificate_password": "password",
                "https_client_certificate_serial": pki.serials[f"kme{peer}-to-kme{kme_id}"],
                "connect_timeout_seconds": 1,
                "read_timeout_seconds": 2,
            } for peer in peers]
            certs = pki.folder / f"kme{kme_id}"
            folder_k = folder / f"kme{kme_id}"
            routed = (routes or {}).get(kme_id, {})
            remote = [(sae, peer) for peer in [*peers, *routed] for sae in SAES[peer]]
            config = write_config(
                folder_k, pki, kme_id=kme_id, local_saes=SAES[kme_id], remote_saes=remote, other_kmes=other_kmes,
                kmes_https_interface={
                    "listen_address": f"127.0.0.1:{ports[kme_id]}",
                    "ca_client_cert_path": str(certs / "ca_kmes.crt"),
                    "server_cert_path": str(certs / "kme_server.crt"),
                    "server_key_path": str(certs / "kme_server.key"),
                },
                debugging_http_interface=f"127.0.0.1:{free_port()}", housekeeping_interval_seconds=housekeeping_interval_seconds,
                **this_kme_extra)
            raw = load_json(config)
            if skip:
                raw["this_kme"]["skip_https_interface"] = {**raw["this_kme"]["saes_https_interface"],
                                                           "listen_address": f"127.0.0.1:{free_port()}"}
            if etsi004:
                raw["this_kme"]["etsi004_interface"] = {**raw["this_kme"]["saes_https_interface"],
                                                        "listen_address": f"127.0.0.1:{free_port()}"}
            if routed:
                raw["routes"] = [{"kme_id": destination, "via": via} for destination, via in routed.items()]
            config.write_text(json.dumps(self._named(raw), indent=2))
            for peer in peers:
                (folder_k / f"keys-{peer}").mkdir(exist_ok=True)
            self.kmes[kme_id] = Kme(self, kme_id, folder_k, config)

    def _named(self, raw: dict) -> dict:
        """A configuration whose KMEs and SAEs carry their IDs from ``kme_names`` and ``sae_names``."""
        kme, sae = (lambda number: self.kme_names.get(number, number)), (lambda n: self.sae_names.get(n, n))
        raw["this_kme"]["id"] = kme(raw["this_kme"]["id"])
        for peer in raw["other_kmes"]:
            peer["id"] = kme(peer["id"])
        for entry in raw["saes"]:
            entry["id"], entry["kme_id"] = sae(entry["id"]), kme(entry["kme_id"])
        for route in raw.get("routes", []):
            route["kme_id"], route["via"] = kme(route["kme_id"]), kme(route["via"])
        return raw

    def __getitem__(self, kme_id: int) -> Kme:
        return self.kmes[kme_id]

    def peer_client(self, caller: int, target: int, pfx_of: int | None = None) -> PeerClient:
        """A client from KME ``caller`` to KME ``target``, optionally with KME ``pfx_of``'s certificate."""
        raw = load_json(self.kmes[caller].config)
        if pfx_of is not None:
            entry = next(peer for peer in raw["other_kmes"] if peer["id"] == self.kmes[target].name)
            entry["https_client_authentication_certificate"] = str(
                self.pki.folder / f"kme{pfx_of}" / f"kme{pfx_of}-to-kme{target}.pfx")
        return PeerClient(parse_config(raw, self.kmes[caller].folder).other_kmes_by_id[self.kmes[target].name])

    def lease_as(self, borrower: int, lender: int, request: dict) -> dict:
        """Ask ``lender`` for a lease in the name of ``borrower`` (the test acting as it), recorded at the borrower
        as applied, as it would record it: the lender, asking about it later, does not take it back."""
        self.kmes[borrower].ledger.write(("INSERT INTO leases (lease_id, link_id, role, parts, created_at) "
                                          "VALUES (?, ?, 'applied', '[]', ?)", request["lease_ID"], lender, utc_now()))
        return self.peer_client(borrower, lender).lease(request)

    def write_link_file(self, a: int, b: int, name: str, keys: int) -> bytes:
        """Write the same key file at both ends of link a–b (staged, then moved in)."""
        data = os.urandom(32 * keys)
        for kme, peer in ((a, b), (b, a)):
            staging = self.kmes[kme].folder / f".{name}.part"
            staging.write_bytes(data)
            os.rename(staging, self.kmes[kme].link_folder(peer) / name)
        return data

    def wait_for_link(self, a: int, b: int, keys: int, timeout: float = 20) -> None:
        """Wait until both ends of link a–b have ingested ``keys`` keys and confirmed that the other holds them."""
        ends = [(self.kmes[x].ledger, self.kmes[y].name) for x, y in ((a, b), (b, a))]
        wait_until(lambda: all(ledger.link(link)["ingested"] == keys and ledger.link(link)["unconfirmed"] == 0
                               for ledger, link in ends), timeout)

    def start_with_links(self, links: list[tuple[int, int]], keys: int) -> "Network":
        """Write one file of ``keys`` keys at both ends of each link, start every KME, and wait until both ends
        of each link hold them all."""
        for a, b in links:
            self.write_link_file(a, b, f"link-{a}-{b}.cor", keys)
        self.start_all()
        for a, b in links:
            self.wait_for_link(a, b, keys)
        return self

    def start_all(self) -> None:
        """Start every KME, side by side (each its processes in turn), and wait until all serve."""
        try:
            with ThreadPoolExecutor(len(self.kmes)) as pool:
                for started in [pool.submit(kme.start) for kme in self.kmes.values()]:
                    started.result()
        except BaseException:
            self.stop_all()
            raise

    def stop_all(self) -> None:
        """End every process of the network: SIGKILL, each gunicorn master with its workers. The test is over, and
        what a KME stored is committed or not, never half; a graceful stop of a pair took 1.5 s (a dozen
        interpreters finalizing at once on two cores), the suite stops about a hundred networks. Kme.stop, for a
        process a test stops on purpose, stays graceful."""
        for kme in self.kmes.values():
            for process in kme.processes.values():
                process.kill()
            kme.processes.clear()
