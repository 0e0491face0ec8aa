"""Flask CLI commands of encryption at rest: rotate-kek (a new key-encryption key) and encrypt-db (a database
from before encryption at rest)."""
from pathlib import Path

import click
from flask import current_app

from kme.config import kek_source
from kme.errors import ConfigError
from kme.operations.command_support import command_config, open_database
from kme.storage import at_rest, kek, statements
from kme.storage.db import meta, read_connection, storage
from kme.storage.meta_names import DATABASE_ID


@click.command("rotate-kek")
@click.option("--new-kek", "new_kek", metavar="SOURCE",
              help="The new key-encryption key, named as this_kme.key_encryption_key names one: a file path, "
                   "credential:NAME or a pkcs11: URI.")
@click.option("--at-once", is_flag=True,
              help="The previous key stops opening the database now, not in an hour (it was exposed).")
@click.option("--finish", is_flag=True,
              help="End the rotation: every process runs with the new key; the previous one stops opening the "
                   "database.")
def rotate_kek_command(new_kek: str | None, at_once: bool, finish: bool) -> None:
    """Wrap the database's data key under a new key-encryption key; the key rows are not touched.

    The KME's running processes keep serving, and for an hour a process
    started with the previous key (a gunicorn master forking a worker again)
    still opens the database. Name the new key in
    this_kme.key_encryption_key (or put it where the old one was), restart
    the processes, then run it with --finish. Running it again changes
    nothing.
    """
    config = command_config()
    uri = config.this_kme.database_uri
    if config.in_memory:
        raise click.ClickException("an in-memory database has no key-encryption key to rotate")
    if finish:
        if new_kek or at_once:
            raise click.ClickException("--finish takes no other option")
        open_database()
        ended = at_rest.end_rotation(expired_only=False)
        click.echo("the previous key-encryption key no longer opens this database" if ended else
                   "no rotation under way; nothing to do")
        return
    if not new_kek:
        raise click.ClickException("--new-kek SOURCE (or --finish) is required")
    try:
        source = kek_source(new_kek, Path.cwd(), None, config.this_kme.database_uri)
        new, _created = kek.open_kek(source)
    except (ConfigError, kek.KekError) as exc:
        raise click.ClickException(f"--new-kek: {exc}") from None
    if _opens(new, uri):
        # Done before (perhaps the configuration names the new key already): the old one is not needed.
        click.echo(f"the data key is already wrapped under {source.describe()}; nothing to do")
        return
    open_database()
    grace = 0 if at_once else kek.ROTATION_GRACE_SECONDS
    try:
        at_rest.rewrap(current_app.extensions["kme_kek"], new, meta(DATABASE_ID), grace)
    except kek.KekError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"the data key is now wrapped under {source.describe()}; " + (
        "the previous key-encryption key no longer opens this database" if at_once else
        f"the previous key-encryption key still opens it for {grace // 60} minutes, for processes started with "
        "it meanwhile"))
    click.echo("next: name the new key in this_kme.key_encryption_key (or put it where the old one was), restart "
               "the KME's processes (the running ones keep serving), then run flask rotate-kek --finish")


def _opens(candidate: kek.Kek, uri: str) -> bool:
    """Whether the database at ``uri`` has a data key and ``candidate`` opens it."""
    try:
        return kek.check_database(uri, candidate)
    except kek.KekError:
        return False


@click.command("encrypt-db")
def encrypt_db_command() -> None:
    """Seal the pool keys a KME from before encryption at rest left in clear, in place, while the KME serves.

    Resumable: stopped at any point, it goes on where it stood when run again;
    when nothing is in clear it says so and changes nothing.
    """
    command_config()
    open_database()
    if not at_rest.store().clear_pool:
        click.echo("every key of the database is sealed; nothing to do")
        return
    with read_connection() as connection:
        total = statements.count_clear_pool_keys(connection)
    sealed, after = 0, 0
    with click.progressbar(length=total, label="sealing pool keys", show_pos=True) as bar:
        while after is not None:
            count, after = at_rest.encrypt_pool_batch(after)
            sealed += count
            bar.update(count)
    # The clear bytes the updates replaced leave the WAL too.
    storage().backend.checkpoint()
    click.echo(f"{sealed} pool keys sealed; no key of the database is in clear")
