"""The KME's interfaces.

The SAE and inter-KME blueprints, their data formats and OpenAPI documents, the
debugging page, /healthz, the TLS peer identity under gunicorn, and the one
mapping of domain errors to HTTP.
"""
