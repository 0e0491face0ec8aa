"""A stand-in for another vendor's KMS, written from the ETSI GS QKD 020 draft 0.4.1 alone: an HTTPS server of
its own PKI that takes the acknowledgements our KME owes it and the keys our KME passes it (ext_keys, which it
acknowledges at the callback URL), and a client of our interop interface.

The server answers acknowledgements as a test sets it to: 200, 503, or no
answer at all (the handler waits until the test or the server's stop
releases it, never longer than HANG_SECONDS). It answers ext_keys with
``keys_answer`` and then acknowledges them with ``ack_status`` (None: never).
"""
import base64
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from kme.operations.certs import generate_pki
from tests.support import PASSWORD, Pki, free_port

HANG_SECONDS = 30
ACK_PATH = "/kmapi/v1/ext_keys/ack"
EXT_KEYS_PATH = "/kmapi/v1/ext_keys"


class StandInKms:
    """The foreign KMS ``kms_id``: its PKI in ``folder`` (its CA signs its server certificate and its client
    certificate ``foreign-kms``, and a ``stranger``), trusting our KME's client certificate of ``caller_ca``."""

    def __init__(self, folder: Path, caller_ca: str, our_server_ca: str, kms_id: str = "foreign-kms"):
        self.id = kms_id
        self.our_server_ca = our_server_ca
        self.keys_answer = 202
        self.ack_status: str | None = "relayed"
        # The extended key containers our KME passed it.
        self.passed: list[dict] = []
        self.folder = folder
        self.serials = generate_pki(folder, {1: ["foreign-kms", "stranger"]}, PASSWORD)
        self.port = free_port()
        self.answer = 200
        self.acks: list[tuple[str, list]] = []
        # Every acknowledgement POSTed, whatever the answer.
        self.attempts = 0
        self.received = threading.Condition()
        self.release = threading.Event()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=caller_ca)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(folder / "kme1" / "kme_server.crt"), str(folder / "kme1" / "kme_server.key"))
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, name="stand-in KMS", daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/kmapi/v1"

    @property
    def ack_url(self) -> str:
        return f"https://127.0.0.1:{self.port}{ACK_PATH}"

    @property
    def server_ca(self) -> str:
        return str(self.folder / "ca_servers.crt")

    def entry(self, pki: Pki, pfx_of: int, to: int, **extra) -> dict:
        """Its entry in our KME's ``foreign_kms``: our client certificate is the test PKI's
        ``kme{pfx_of}-to-kme{to}``."""
        pfx = pki.folder / f"kme{pfx_of}" / f"kme{pfx_of}-to-kme{to}.pfx"
        return {"id": self.id, "https_client_certificate_serial": self.serials["foreign-kms"],
                "base_url": self.base_url, "https_client_authentication_certificate": str(pfx),
                "https_client_authentication_certificate_password": PASSWORD,
                "server_ca_cert_path": self.server_ca, "connect_timeout_seconds": 1, "read_timeout_seconds": 1,
                **extra}

    def client_ca(self) -> str:
        """The CA of its client certificates (our interop interface's ca_client_cert_path)."""
        return str(self.folder / "kme1" / "ca_saes.crt")

    def session(self, name: str = "foreign-kms") -> requests.Session:
        """A client of our interop interface with its certificate ``name``."""
        client = requests.Session()
        client.cert = (str(self.folder / "kme1" / f"{name}.crt"), str(self.folder / "kme1" / f"{name}.key"))
        client.trust_env = False
        return client

    def respond(self, answer: int | None) -> None:
        """Answer acknowledgements with HTTP ``answer`` from now on, or, None, not at all (until the next call)."""
        self.answer = answer
        if answer is None:
            self.release.clear()
        else:
            self.release.set()

    def acks_for(self, key_id: str, count: int = 1, timeout: float = 20) -> list[dict]:
        """The acknowledgement containers naming ``key_id``, once ``count`` of them arrived (TimeoutError else)."""
        deadline = time.monotonic() + timeout
        with self.received:
            while True:
                found = [container for _path, body in self.acks for container in body
                         if any(item.get("key_id") == key_id for item in container.get("key_ids", []))]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{count} acknowledgements of key {key_id} not received: {found}")
                self.received.wait(left)

    def acknowledge(self, container: dict, status: str) -> requests.Response:
        """Acknowledge a container our KME passed, one ack container per target, as the draft says."""
        acks = [{"key_ids": [{"key_id": key["key_id"]} for key in container["keys"]], "ack_status": status,
                 "initiator_sae_id": container["initiator_sae_id"], "target_sae_id": target,
                 **({} if status == "relayed" else {"message": "no route to the target SAE"})}
                for target in container["target_sae_ids"]]
        with self.session() as client:
            return client.post(container["ack_callback_url"], json=acks, verify=self.our_server_ca, timeout=10)

    def passed_key(self, key_id: str) -> tuple[dict, bytes]:
        """The container our KME passed with ``key_id``, and that key's bytes."""
        for container in self.passed:
            for key in container["keys"]:
                if key["key_id"] == key_id:
                    return container, base64.b64decode(key["value"])
        raise KeyError(key_id)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        kms = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == EXT_KEYS_PATH:
                    return self._ext_keys(json.loads(body))
                if self.path != ACK_PATH:
                    return self._reply(404, {"message": "no such route"})
                with kms.received:
                    kms.attempts += 1
                    kms.received.notify_all()
                if kms.answer is None:
                    kms.release.wait(HANG_SECONDS)
                    return None
                if kms.answer == 200:
                    with kms.received:
                        kms.acks.append((self.path, json.loads(body)))
                        kms.received.notify_all()
                return self._reply(kms.answer, {} if kms.answer == 200 else {"message": "not now"})

            def _ext_keys(self, container: dict) -> None:
                with kms.received:
                    kms.passed.append(container)
                    kms.received.notify_all()
                self._reply(kms.keys_answer, {} if kms.keys_answer == 202 else {"message": "not now"})
                if kms.keys_answer == 202 and kms.ack_status is not None:
                    kms.acknowledge(container, kms.ack_status)

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        return Handler
