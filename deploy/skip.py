"""Gunicorn config of the Cisco SKIP interface: KME_CONFIG=path gunicorn -c deploy/skip.py wsgi:skip_app"""
from kme.interfaces.gunicorn_conf import settings

globals().update(settings("skip_https_interface"))
