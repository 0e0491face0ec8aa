"""The ceilings of bench/web_stack.py: WSGI apps served by deploy/sae.py, the KME's own gunicorn configuration.

``app`` answers a constant JSON body (what the web stack alone costs);
``relay_app`` makes one keep-alive mutual-TLS call to another ``app`` per
request first, as a remote enc_keys calls its peer KME (the target, client
certificate and CA come from BENCH_RELAY_* variables); ``flask_app`` answers
the same body from a Flask view (what Flask alone adds to the stack).
"""
import os
import threading

import requests
from flask import Flask, Response

_BODY = b'{"keys": [{"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139", "key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}]}'
_HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(_BODY)))]
_local = threading.local()


def app(environ, start_response):
    """A constant key container."""
    start_response("200 OK", _HEADERS)
    return [_BODY]


def relay_app(environ, start_response):
    """One call to the relay target per request, on a keep-alive session of this thread."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.trust_env = False
        session.cert = (os.environ["BENCH_RELAY_CERT"], os.environ["BENCH_RELAY_KEY"])
        session.verify = os.environ["BENCH_RELAY_CA"]
    answer = session.get(os.environ["BENCH_RELAY_URL"], timeout=10)
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer.content)))])
    return [answer.content]


flask_app = Flask(__name__)


@flask_app.route("/api/v1/keys/<slave_sae_id>/enc_keys")
def flask_constant(slave_sae_id: str):
    """The constant key container, from a Flask view without hooks."""
    return Response(_BODY, mimetype="application/json")
