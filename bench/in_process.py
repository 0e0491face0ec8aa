"""What an SAE call costs inside the app alone: no TLS, no gunicorn, one thread.

Usage: .venv/bin/python bench/in_process.py [calls per measurement, default 3000] [call to profile]

Ingests 100 000 keys into a fresh SQLite file (encryption at rest on, as
shipped) and calls the SAE interface's WSGI app directly on prepared
environs, with the client certificate's keys set as the gunicorn worker
sets them. Prints milliseconds per call for enc_keys (number=1), dec_keys,
Get status and Get entropy. With a call's name ("enc_keys", "dec_keys",
"status", "entropy"), then profiles that call with cProfile and prints the
functions that took the most time, with what they called: where the app's
own time goes (docs/performance.md, "What dominates now"), apart from the
server around it, which bench/web_stack.py measures.
"""
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kme import create_app  # noqa: E402
from kme.config import load_config  # noqa: E402
from kme.operations.certs import generate_pki  # noqa: E402
from kme.operations.ingest import ingest_directories  # noqa: E402
from kme.storage.schema import ensure_schema  # noqa: E402
from tests.conftest import PKI_LAYOUT, sae_environ  # noqa: E402
from tests.support import PASSWORD, Pki, write_config  # noqa: E402

KEYS = 100_000
WARM_UP = 200


class App:
    """The SAE interface's WSGI app of a fresh KME, called directly."""

    def __init__(self, folder: Path):
        pki = Pki(folder / "pki", generate_pki(folder / "pki", PKI_LAYOUT, PASSWORD))
        config = write_config(folder / "kme1", pki, log_level="WARNING")
        with open(folder / "kme1" / "keys" / "pool.cor", "wb") as handle:
            handle.write(os.urandom(32 * KEYS))
        self.app = create_app(load_config(config), interface="sae")
        with self.app.app_context():
            ensure_schema()
            ingest_directories(self.app.extensions["kme"])
        self.callers = {sae: sae_environ(pki, f"sae{sae}") for sae in (1, 2)}

    def call(self, sae: int, path: str, query: str = "") -> str:
        """GET ``path`` as SAE ``sae``; the status line's code and the body."""
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1",
                   "SERVER_PORT": "443", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1",
                   "wsgi.url_scheme": "https", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
                   **self.callers[sae]}
        statuses = []
        body = b"".join(self.app.wsgi_app(environ, lambda status, _headers: statuses.append(status)))
        if not statuses[0].startswith("200"):
            raise RuntimeError(f"{path}: {statuses[0]} {body[:200]!r}")
        return body.decode()

    def key_ids(self, count: int) -> list[str]:
        """Key IDs SAE 1 obtained for SAE 2, for dec_keys."""
        found = []
        while len(found) < count:
            body = self.call(1, "/api/v1/keys/2/enc_keys", "number=128")
            found += [part.split('"')[0] for part in body.split('"key_ID":"')[1:]]
        return found[:count]


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    profiled = sys.argv[2] if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory(prefix="kme-in-process-") as folder:
        app = App(Path(folder))
        fetched = iter(app.key_ids(WARM_UP + 2 * calls))
        measured = {
            "enc_keys": lambda: app.call(1, "/api/v1/keys/2/enc_keys"),
            "dec_keys": lambda: app.call(2, "/api/v1/keys/1/dec_keys", f"key_ID={next(fetched)}"),
            "status": lambda: app.call(1, "/api/v1/keys/2/status"),
            "entropy": lambda: app.call(1, "/api/v1/keys/entropy/total"),
        }
        print(f"{calls} calls each, one thread, no TLS nor server")
        for name, action in measured.items():
            for _ in range(WARM_UP if name != "dec_keys" else 0):
                action()
            started = time.perf_counter()
            for _ in range(calls):
                action()
            print(f"{name:<9} {(time.perf_counter() - started) / calls * 1e3:.3f} ms per call", flush=True)
        if profiled:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(calls):
                measured[profiled]()
            profile.disable()
            report = io.StringIO()
            pstats.Stats(profile, stream=report).sort_stats("cumulative").print_stats(30)
            print(report.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
