"""WSGI entry points: ``sae_app``, ``kme_app``, ``skip_app``, ``interop_app`` and ``debug_app`` for gunicorn,
``app`` for the flask CLI.

Each app is built on first access, so importing this module for one of them
never loads the configuration for another.
"""
import sys

from kme import create_app
from kme.config import ConfigError

_INTERFACES = {"sae_app": "sae", "kme_app": "kme", "skip_app": "skip", "interop_app": "interop", "debug_app": "debug",
               "app": "cli"}


def __getattr__(name: str):
    if name not in _INTERFACES:
        raise AttributeError(name)
    try:
        app = create_app(interface=_INTERFACES[name])
    except ConfigError as exc:
        print(exc.for_operator(), file=sys.stderr)
        # In a gunicorn worker, status 3 (worker boot error) stops the master instead of forking the worker again.
        sys.exit(1 if name == "app" else 3)
    globals()[name] = app
    return app
