"""Gunicorn config of the inter-KME interface: KME_CONFIG=path gunicorn -c deploy/kme.py wsgi:kme_app"""
from kme.interfaces.gunicorn_conf import settings

globals().update(settings("kmes_https_interface"))
