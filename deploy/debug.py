"""Gunicorn config of the debugging page: KME_CONFIG=path gunicorn -c deploy/debug.py wsgi:debug_app"""
from kme.interfaces.gunicorn_conf import debug_settings

globals().update(debug_settings())
