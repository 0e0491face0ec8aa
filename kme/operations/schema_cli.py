"""`flask db`: Flask-Migrate's schema commands (kme.storage.migrations), loaded when one of them runs.

Alembic and Flask-Migrate take a fifth of a process's start: the
ingestion worker and every other command never load them.
"""
import click
from flask import current_app

from kme.operations.command_support import command_config
from kme.storage import migrations
from kme.storage.db import db


class _SchemaCommands(click.Command):
    """Stands for Flask-Migrate's `db` group in the command list; the group itself parses and runs."""

    def make_context(self, info_name, args, parent=None, **extra):
        from flask_migrate import Migrate
        from flask_migrate.cli import db as commands

        command_config()
        if "migrate" not in current_app.extensions:
            Migrate(current_app, db, directory=str(migrations.DIRECTORY))
        return commands.make_context(info_name, args, parent=parent, **extra)


schema_commands = _SchemaCommands("db", help="Perform database migrations (upgrade, downgrade, current, ...).")
