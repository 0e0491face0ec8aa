"""The SAE app with encryption at rest off for good (bench/clear_store.py), for bench/web_stack.py:
``gunicorn -c deploy/sae.py bench.clear_app:app``. A worker that serves it serves nothing else."""
from bench.clear_store import turn_off

turn_off()

from wsgi import sae_app as app  # noqa: E402,F401
