"""Flask CLI command restored-from-backup: a database that went back in time made safe to serve again."""
import click
from flask import current_app

from kme import ids
from kme.operations import key_folders
from kme.operations.command_support import cause, command_config, key_files, open_database, storage_errors
from kme.storage import handout_mark, statements
from kme.storage.db import meta, read_connection
from kme.storage.keystore import recovery
from kme.storage.meta_names import DATABASE_ID


@click.command("restored-from-backup")
@click.option("--force", is_flag=True,
              help="Also when the database is not behind this host's hand-out mark (a backup restored on a host "
                   "whose key folder lost its mark, or a failover another host noticed).")
def restored_from_backup_command(force: bool) -> None:
    """Make a database restored from a backup, or a standby promoted behind its primary, safe to serve again.

    Stop every process of the KME first. The database gets a new ID; every key
    it holds that could have been handed out since the backup is set aside
    (our direction of each link, the local zone, the keys waiting for their
    slaves, those foreign KMSs passed included), the key files present are read no further, and the peers learn
    this KME's progress afresh. Only keys of files added later are used.
    """
    config = command_config()
    if config.in_memory:
        raise click.ClickException("an in-memory database is never restored from a backup")
    open_database()
    zone = config.this_kme.key_directory_to_watch
    database_id = meta(DATABASE_ID).decode()
    try:
        mark = handout_mark.read(zone)
        with read_connection() as connection:
            spent = statements.spent_total(connection)
        if handout_mark.problem(zone, mark, database_id, spent) is None and not force:
            raise click.ClickException(f"the database is not behind the hand-out mark in {zone}: nothing to do "
                                       "(--force sets its keys aside all the same)")
        sizes = {link_id: dict(key_files(directory)) for link_id, directory in config.key_directories().items()
                 if directory.is_dir()}
        # A foreign KMS's link has no key files, only the keys it passed, waiting for their slaves.
        sizes.update({foreign.id: {} for foreign in config.foreign_kms})
        new_id, done = recovery.forget_since_backup(current_app.extensions["kme_kek"], sizes)
        with read_connection() as connection:
            spent = statements.spent_total(connection)
    except storage_errors() as exc:
        raise click.ClickException(cause(exc)) from None
    for link_id, directory in config.key_directories().items():
        try:
            key_folders.write_mark(directory, config.this_kme.id, new_id)
        except OSError as exc:
            click.echo(f"warning: {directory}: folder mark not written ({exc.strerror})", err=True)
    handout_mark.reset(zone, new_id, spent)
    for link_id, (aside, erased) in sorted(done.items(), key=lambda item: ids.order(item[0])):
        click.echo(f"link {link_id}: {aside} keys set aside, {erased} keys waiting for their slaves erased, "
                   f"{len(sizes.get(link_id, {}))} key files read no further")
    click.echo(f"database {database_id} is now database {new_id}: restart the KME; only keys of files added from "
               "now on are used")
