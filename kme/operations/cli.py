"""Flask CLI commands: ingest-keys (one shot or --watch), kme-status, adopt-key-folders, gen-certs,
gen-foreign-certs and serve-etsi004, and the registration of every command (rotate-kek and encrypt-db are in
kme.operations.key_encryption_cli, restored-from-backup in kme.operations.recovery_cli, what they share in
kme.operations.command_support)."""
import signal
import sys
import threading
from pathlib import Path

import click
from flask import current_app

from kme import ids
from kme.interfaces import etsi004_server
from kme.operations import certs, health, key_encryption_cli, key_folders, recovery_cli, schema_cli, status
from kme.operations.command_support import cause, command_config, key_files, open_database, storage_errors
from kme.operations.ingest import ingest_directories
from kme.operations.watch import watch
from kme.storage import handout_mark, kek, statements
from kme.storage.db import meta, read_connection
from kme.storage.keystore import intake
from kme.storage.meta_names import DATABASE_ID


def _print_summary(summary) -> None:
    for warning in summary.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(summary.line())


@click.command("ingest-keys")
@click.option("--watch", "keep_watching", is_flag=True,
              help="Keep running: ingest every key file as soon as it is complete.")
def ingest_keys_command(keep_watching: bool) -> None:
    """Ingest the .cor key files of every configured key directory."""
    config = command_config()
    if config.in_memory:
        raise click.ClickException(
            "this_kme.sqlite_db_path: ':memory:' lives in one process; the KME server ingests keys itself then")
    for link_id, directory in config.key_directories().items():
        if not directory.is_dir():
            raise click.ClickException(f"key directory of link {link_id} does not exist: {directory}")
    if not keep_watching:
        open_database()
        try:
            _print_summary(ingest_directories(config, show_progress=sys.stdout.isatty()))
        except storage_errors() as exc:
            raise click.ClickException(f"ingestion stopped: {cause(exc)}") from None
        return
    # The watcher outlives a database it cannot use yet, but not a key-encryption key that does not open it.
    try:
        kek.check_database(config.this_kme.database_uri, current_app.extensions["kme_kek"])
    except kek.KekError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())

    def ready(summary):
        _print_summary(summary)
        click.echo(f"watching {len(config.key_directories())} key directories", nl=True)
        sys.stdout.flush()

    summary = watch(config, stop, on_ready=ready)
    click.echo(f"stopped; {summary.line()}")


@click.command("adopt-key-folders")
@click.option("--existing", type=click.Choice(["used", "new"]), required=True,
              help="used: the key files present now are never ingested (their keys may have been handed out); "
                   "new: they are ingested as new keys (only if no key of theirs was ever used).")
def adopt_key_folders_command(existing: str) -> None:
    """Bind key folders marked by another database to this one, after an operator's decision."""
    config = command_config()
    open_database()
    database_id = meta(DATABASE_ID).decode()
    adopted = 0
    for link_id, directory in config.key_directories().items():
        mark = key_folders.read_mark(directory, config.this_kme.id)
        if mark is None or mark == database_id:
            continue
        retired = intake.retire_files(link_id, key_files(directory)) if existing == "used" else 0
        key_folders.write_mark(directory, config.this_kme.id, database_id)
        adopted += 1
        click.echo(f"link {link_id}: {directory} adopted (was {mark}); "
                   + (f"{retired} files present retired, never ingested" if existing == "used"
                      else "its files are ingested as new keys"))
    zone = config.this_kme.key_directory_to_watch
    handed_out = handout_mark.read(zone)
    if handed_out is not None and handed_out[0] != database_id:
        with read_connection() as connection:
            handout_mark.reset(zone, database_id, statements.spent_total(connection))
    click.echo(f"{adopted} key folders adopted by database {database_id}")


def _parse_sae(value: str) -> tuple:
    sae, _, kme = value.partition("@")
    sae_id = ids.from_text(sae)
    if sae_id is None or not (kme.isascii() and kme.isdigit()):
        raise click.BadParameter(f"{value!r} is not of the form SAE_ID@KME_NUMBER (an SAE ID, a KME's number)")
    return sae_id, int(kme)


@click.command("gen-certs")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("certs"), show_default=True,
              help="Folder to write the PKI into.")
@click.option("--sae", "saes", multiple=True, default=("1@1", "2@1", "3@2"), show_default=True,
              help="An SAE and its KME, as SAE_ID@KME_NUMBER (alice-app@1: an SAE ID, integer or string, and the "
                   "number of the KME's folder kmeN); repeat for each SAE.")
@click.option("--kme", "kmes", multiple=True, type=int,
              help="A KME without SAEs of its own (KMEs of --sae are included anyway).")
@click.option("--password", default="password", show_default=True, help="Password of the KME client .pfx files.")
@click.option("--days", default=825, show_default=True, help="Validity of every certificate.")
def gen_certs_command(out: Path, saes: tuple[str, ...], kmes: tuple[int, ...], password: str, days: int) -> None:
    """Write a demo PKI: CAs, KME server certificates, SAE and KME client certificates."""
    saes_by_kme: dict[int, list] = {kme: [] for kme in kmes}
    for sae, kme in map(_parse_sae, saes):
        saes_by_kme.setdefault(kme, []).append(sae)
    serials = certs.generate_pki(out, saes_by_kme, password, days)
    click.echo(f"PKI written to {out}/. Client certificate serials, as the configuration writes them:")
    for name, serial in serials.items():
        click.echo(f'  {name}: "https_client_certificate_serial": {serial}')


def _table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(value)) for value in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip()
             for row in [headers, ["-" * width for width in widths], *rows]]
    return "\n".join(lines)


@click.command("gen-foreign-certs")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("certs/foreign"),
              show_default=True, help="Folder to write the foreign vendor's PKI into.")
@click.option("--kme", "kmes", multiple=True, type=int, default=(1,), show_default=True,
              help="A KME that calls the foreign KMS (its client certificate kmeN-to-foreign.pfx); repeat for each.")
@click.option("--password", default="password", show_default=True, help="Password of the KME client .pfx files.")
@click.option("--days", default=825, show_default=True, help="Validity of every certificate.")
def gen_foreign_certs_command(out: Path, kmes: tuple[int, ...], password: str, days: int) -> None:
    """Write the demo PKI of another vendor's KMS (ETSI GS QKD 020): its CA, its KMS's certificate, our KMEs'
    client certificates towards it."""
    serials = certs.generate_foreign_pki(out, list(kmes), password, days)
    click.echo(f"wrote the foreign vendor's PKI to {out}")
    for name, serial in serials.items():
        click.echo(f"  {name}: https_client_certificate_serial {serial}")


@click.command("serve-etsi004")
def serve_etsi004_command() -> None:
    """Serve ETSI GS QKD 004 key streams to this KME's SAEs on this_kme.etsi004_interface, until SIGTERM."""
    config = command_config()
    interface = config.this_kme.etsi004_interface
    if interface is None:
        raise click.ClickException("this_kme.etsi004_interface: missing (no ETSI GS QKD 004 server is configured)")
    open_database()
    etsi004_server.serve(current_app._get_current_object(), config,
                         on_ready=lambda: click.echo(f"serving ETSI GS QKD 004 on {interface.listen_address}"))


@click.command("kme-status")
def kme_status_command() -> None:
    """Print each link's key pool, the routes to other KMEs and the registered SAEs."""
    config = command_config()
    open_database()
    links = status.links(config)
    click.echo(f"{config.this_kme.nickname} (KME {config.this_kme.id})")
    encryption = health.encryption(config, current_app.extensions["kme_kek"].source)
    click.echo(f"encryption at rest: on, keys {encryption['keys']}; key-encryption key: "
               f"{encryption['key_encryption_key']}\n")
    click.echo(_table(
        ["link", "available", "delivered", "waiting", "peer's", "reserved", "unconfirmed", "discarded", "set aside",
         "relayed", "files", "last file", "peer"],
        [[link["name"], link["available"], link["delivered"], link["waiting"], link["peer_held"], link["reserved"],
          link["unconfirmed"], link["discarded"], link["set_aside"], link["relayed"], link["files"],
          link["last_file"] or "-",
          "-" if link["peer"] is None else ("reachable" if link["peer"]["reachable"] else "unreachable")]
         for link in links]))
    click.echo()
    click.echo(_table(
        ["direction", "available", "leased in", "in use"],
        [[f"KME {way['from']} -> KME {way['to']}", way["available"], way["leased"],
          "-" if way["in_use"] is None else way["in_use"]]
         for link in links for way in link["directions"]]))
    foreign = [link for link in links if link["interop"] is not None]
    if foreign:
        click.echo()
        click.echo(_table(
            ["foreign KMS (ETSI GS QKD 020)", "keys held", "relayed on", "failed", "voided", "acks pending", "sent",
             "given up"],
            [[link["link"], *(link["interop"]["keys"].get(state, 0) for state in ("held", "relayed", "failed",
                                                                                  "voided")),
              *(link["interop"]["acks"].get(state, 0) for state in ("pending", "sent", "failed"))]
             for link in foreign]))
        for ack in status.failed_acks(config):
            click.echo(f"acknowledgement {ack['id']} to foreign KMS {ack['foreign_kms']} given up after "
                       f"{ack['attempts']} attempts ({ack['created_at']}): {ack['error']}")
    key_streams = status.streams(config)
    if key_streams:
        click.echo()
        click.echo(_table(
            ["key stream (ETSI GS QKD 004)", "master", "slave", "chunk bytes", "TTL s", "master end", "slave end",
             "chunks made", "waiting"],
            [[stream["ksid"] + (" (closed)" if stream["closed"] else ""), stream["master"], stream["slave"],
              stream["chunk_size"], stream["ttl_seconds"], stream["master_end"], stream["slave_end"],
              stream["chunks_made"], stream["chunks_waiting"]] for stream in key_streams]))
    click.echo()
    click.echo(_table(["route to", "next hop", "how"],
                      [[f"KME {route['kme_id']}", f"KME {route['via']}", route["kind"]]
                       for route in status.routes(config)]))
    click.echo()
    click.echo(_table(["SAE", "KME", "certificate serial"],
                      [[sae["id"], sae["kme_id"], sae["serial"] or "-"] for sae in status.saes(config)]))


def init_app(app) -> None:
    """Register the CLI commands."""
    app.cli.add_command(ingest_keys_command)
    app.cli.add_command(gen_certs_command)
    app.cli.add_command(gen_foreign_certs_command)
    app.cli.add_command(kme_status_command)
    app.cli.add_command(serve_etsi004_command)
    app.cli.add_command(adopt_key_folders_command)
    app.cli.add_command(key_encryption_cli.rotate_kek_command)
    app.cli.add_command(key_encryption_cli.encrypt_db_command)
    app.cli.add_command(recovery_cli.restored_from_backup_command)
    # `flask db upgrade` and the other schema commands (kme.storage.migrations).
    app.cli.add_command(schema_cli.schema_commands)
