"""Operations.

Key file ingestion and the background worker, health, metrics, logs and events,
operators' views, the CLI and the demo PKI.
"""
