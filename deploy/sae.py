"""Gunicorn config of the SAE interface: KME_CONFIG=path gunicorn -c deploy/sae.py wsgi:sae_app"""
from kme.interfaces.gunicorn_conf import settings

globals().update(settings("saes_https_interface"))
