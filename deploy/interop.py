"""Gunicorn config of the ETSI GS QKD 020 interop interface: KME_CONFIG=path gunicorn -c deploy/interop.py
wsgi:interop_app"""
from kme.interfaces.gunicorn_conf import settings

globals().update(settings("interop_https_interface"))
