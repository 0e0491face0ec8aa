"""What every flask command of the KME shares: its configuration, the database opened, storage failures in one
line, the key files of a folder."""
import os
from pathlib import Path

import click
from flask import current_app
from sqlalchemy.exc import DBAPIError

from kme.errors import StorageFailure
from kme.operations.ingest import KEY_FILE_SUFFIX
from kme.storage import backends
from kme.storage.schema import ensure_schema


def command_config():
    """The configuration of the KME a command works on; a one-line error without one."""
    config = current_app.extensions.get("kme")
    if config is None:
        raise click.ClickException("KME_CONFIG: not set (it names the configuration file)")
    return config


def storage_errors() -> tuple:
    """The exceptions that mean the database failed, for the configured engine."""
    return DBAPIError, *backends.for_uri(command_config().this_kme.database_uri).DRIVER_ERRORS, StorageFailure


def cause(error: Exception) -> str:
    """A storage failure in one line, without key material."""
    if isinstance(error, StorageFailure):
        return error.cause
    return backends.for_uri(command_config().this_kme.database_uri).failure_cause(error)


def open_database() -> None:
    """Open the database (schema, data key) for a command; a one-line error if it cannot be used (a wrong KEK)."""
    try:
        ensure_schema()
    except storage_errors() as exc:
        raise click.ClickException(cause(exc)) from None



def key_files(directory: Path) -> list[tuple[str, int]]:
    """(name, size) of the .cor files directly in ``directory``."""
    return [(entry.name, entry.stat(follow_symlinks=False).st_size) for entry in os.scandir(directory)
            if entry.name.endswith(KEY_FILE_SUFFIX) and entry.is_file(follow_symlinks=False)]
