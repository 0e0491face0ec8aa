"""Configuration: each class of mistake stops start-up with one line naming the field."""
import json
import os
import subprocess
import sys

import pytest
from sqlalchemy.engine import make_url

from kme import database_uris, ids
from kme.config import KEY_BITS, load_config
from kme.errors import ConfigError
from tests.support import ROOT, bare_environment, run_cli, write_config

pytestmark = pytest.mark.engine_independent


@pytest.fixture
def config_file(tmp_path, pki):
    path = write_config(tmp_path, pki, other_kmes=[{
        "id": 2,
        "key_directory_to_watch": "keys2",
        "inter_kme_bind_address": "127.0.0.1:14001",
        "https_client_authentication_certificate": str(pki.folder / "kme1" / "kme1-to-kme2.pfx"),
        "https_client_authentication_certificate_password": "password",
    }], remote_saes=[(3, 2)])
    return path


def edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def error_of(path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_valid_config_loads_with_defaults(config_file):
    config = load_config(config_file)
    assert config.this_kme.nickname == "Test1"
    assert config.this_kme.limits.key_size == KEY_BITS
    assert config.this_kme.database_uri == f"sqlite:///{config_file.parent / 'kme.db'}"
    assert config.key_directories() == {1: config_file.parent / "keys", 2: config_file.parent / "keys2"}
    assert config.other_kmes[0].ignore_system_proxy_settings is False


def test_json5_with_comments_trailing_commas_and_hex(config_file):
    data = json.loads(config_file.read_text())
    serial = data["saes"][0]["https_client_certificate_serial"]
    data["saes"][0]["https_client_certificate_serial"] = "HEX"
    text = json.dumps(data).replace('"HEX"', "[" + ", ".join(hex(b) for b in serial) + ",]")
    config_file.write_text("// KME under test\n" + text)
    config = load_config(config_file)
    assert config.saes_by_id[1].certificate_serial == int.from_bytes(bytes(serial), "big")


def test_relative_paths_resolve_against_the_config_folder(config_file, tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    assert load_config(config_file).this_kme.key_directory_to_watch == tmp_path / "keys"


def test_string_ids_load_beside_integer_ones_as_configured(config_file):
    def strings(data):
        data["other_kmes"][0]["id"] = "kme-b.site~2"
        data["saes"][1]["id"] = "alice-app"
        data["saes"][2].update(id="CONSB", kme_id="kme-b.site~2")
        data["saes"].append({"id": 4, "kme_id": "kme-b.site~2"})

    config = load_config(edit(config_file, strings))
    assert config.saes_by_id["alice-app"].kme_id == 1
    assert config.saes_by_id["CONSB"].kme_id == "kme-b.site~2" and config.saes_by_id[4].kme_id == "kme-b.site~2"
    assert config.next_hop("kme-b.site~2").id == "kme-b.site~2"
    assert set(config.key_directories()) == {1, "kme-b.site~2"}
    # Links read back from the database as numbers are named by their configured IDs again.
    assert {config.kme_id(ids.number(kme)) for kme in (1, "kme-b.site~2")} == {1, "kme-b.site~2"}


def test_every_bad_id_gets_a_line_of_its_own(config_file):
    def two_bad(data):
        data["this_kme"]["id"] = "kme 1"
        data["saes"][0]["id"] = "x" * 300

    with pytest.raises(ConfigError) as caught:
        load_config(edit(config_file, two_bad))
    assert [line.split(":")[0] for line in str(caught.value).splitlines()] == ["saes[0].id", "this_kme.id"]


def test_two_string_ids_stored_as_one_number_are_refused(config_file, monkeypatch):
    # Two digests meeting in 63 bits is never seen; the check is shown with a number that makes them meet.
    monkeypatch.setattr(ids, "number", lambda value: value if isinstance(value, int) else -7)
    edit(config_file, lambda data: [data["saes"][0].update(id="sae-a"), data["saes"][1].update(id="sae-b")])
    assert error_of(config_file) == ("saes[1].id: SAE ID sae-b and SAE ID sae-a are stored as one number; "
                                     "rename one")


MISTAKES = [
    ("missing field", lambda d: d["other_kmes"][0].pop("inter_kme_bind_address"),
     "other_kmes[0].inter_kme_bind_address: missing"),
    ("missing section", lambda d: d.pop("saes"), "saes: missing"),
    ("wrong type", lambda d: d["this_kme"].update(id=1.5), "this_kme.id: not an ID (an integer from 0 to 2^63-1, "
     "or 1 to 291 letters, digits, '-', '_', '.' or '~' that are not all digits)"),
    ("boolean as ID", lambda d: d["saes"][0].update(id=True), "saes[0].id: not an ID"),
    ("ID beyond 64 bits", lambda d: d["this_kme"].update(id=2**63), "this_kme.id: not an ID"),
    ("negative ID", lambda d: d["this_kme"].update(id=-1), "this_kme.id: not an ID"),
    ("string ID of digits only", lambda d: d["saes"][0].update(id="12"), "saes[0].id: not an ID"),
    ("empty string ID", lambda d: d["other_kmes"][0].update(id=""), "other_kmes[0].id: not an ID"),
    ("string ID with a slash", lambda d: d["saes"][1].update(kme_id="kme/2"), "saes[1].kme_id: not an ID"),
    ("string ID with a space", lambda d: d["saes"][1].update(id="sae 2"), "saes[1].id: not an ID"),
    ("string ID beyond 291 characters", lambda d: d["saes"][0].update(id="a" * 292), "saes[0].id: not an ID"),
    ("string ID beyond ASCII", lambda d: d["saes"][0].update(id="säe"), "saes[0].id: not an ID"),
    ("bad address", lambda d: d["this_kme"]["saes_https_interface"].update(listen_address="localhost"),
     "this_kme.saes_https_interface.listen_address: not an address"),
    ("unknown SAE kme_id", lambda d: d["saes"].append({"id": 7, "kme_id": 5}), "saes[3].kme_id: unknown KME 5"),
    ("duplicate SAE ID", lambda d: d["saes"].append({"id": 3, "kme_id": 2}), "saes[3].id: duplicate SAE ID 3"),
    ("duplicate KME ID", lambda d: d["other_kmes"][0].update(id=1), "other_kmes[0].id: duplicate KME ID 1"),
    ("unreadable certificate", lambda d: d["this_kme"]["saes_https_interface"].update(server_cert_path="none.crt"),
     "this_kme.saes_https_interface.server_cert_path: not found"),
    ("not a certificate", lambda d: d["this_kme"]["saes_https_interface"].update(ca_client_cert_path="config.json"),
     "this_kme.saes_https_interface.ca_client_cert_path: not a PEM certificate"),
    ("wrong pfx password", lambda d: d["other_kmes"][0].update(https_client_authentication_certificate_password="x"),
     "other_kmes[0].https_client_authentication_certificate: not a PKCS#12 file that this password opens"),
    ("unknown top-level key", lambda d: d.update(extra=1), "extra: unknown field"),
    ("unknown nested key", lambda d: d["this_kme"].update(nick="x"), "this_kme.nick: unknown field"),
    ("local SAE without serial", lambda d: d["saes"][0].pop("https_client_certificate_serial"),
     "saes[0].https_client_certificate_serial: missing"),
    ("serial of a remote SAE", lambda d: d["saes"][2].update(https_client_certificate_serial=[1]),
     "saes[2].https_client_certificate_serial: only for SAEs of this KME"),
    ("serial byte out of range", lambda d: d["saes"][0].update(https_client_certificate_serial=[300]),
     "saes[0].https_client_certificate_serial[0]: not a byte"),
    ("key size outside min/max", lambda d: d["this_kme"].update(limits={"key_size": 64, "min_key_size": 128}),
     "this_kme.limits.key_size: must lie between min_key_size and max_key_size"),
    ("key size not a multiple of 8", lambda d: d["this_kme"].update(limits={"max_key_size": 1001}),
     "this_kme.limits.max_key_size: must be a multiple of 8"),
    ("both database fields", lambda d: d["this_kme"].update(db_uri="sqlite:///x.db"), "this_kme.db_uri: give either"),
    ("no database", lambda d: d["this_kme"].pop("sqlite_db_path"), "this_kme.sqlite_db_path: missing"),
    ("sqlite URI without its three slashes", lambda d: (d["this_kme"].pop("sqlite_db_path"),
                                                        d["this_kme"].update(db_uri="sqlite://kme.db")),
     "this_kme.db_uri: SQLite is named sqlite:///path or :memory:"),
    ("bare path as db_uri", lambda d: (d["this_kme"].pop("sqlite_db_path"), d["this_kme"].update(db_uri="kme.db")),
     "this_kme.db_uri: SQLite is named sqlite:///path or :memory:"),
    ("unknown engine", lambda d: (d["this_kme"].pop("sqlite_db_path"), d["this_kme"].update(db_uri="mysql://db/kme")),
     "this_kme.db_uri: the KME runs on sqlite or postgresql, not mysql"),
    ("postgresql through another driver", lambda d: (d["this_kme"].pop("sqlite_db_path"),
                                                     d["this_kme"].update(db_uri="postgresql+psycopg2://db/kme")),
     "this_kme.db_uri: PostgreSQL is reached through psycopg 3: postgresql+psycopg://..."),
    ("postgresql without a database", lambda d: (d["this_kme"].pop("sqlite_db_path"),
                                                 d["this_kme"].update(db_uri="postgresql+psycopg://kme@db")),
     "this_kme.db_uri: names no database"),
    ("boolean as string", lambda d: d["this_kme"].update(delete_key_file_after_read="yes"),
     "this_kme.delete_key_file_after_read: not a boolean"),
    ("second peer without serial", lambda d: d["other_kmes"].append({**d["other_kmes"][0], "id": 4,
                                                                      "key_directory_to_watch": "keys4"}),
     "other_kmes[0].https_client_certificate_serial: missing (required when there is more than one other KME)"),
    ("timeout not a number", lambda d: d["other_kmes"][0].update(read_timeout_seconds="5"),
     "other_kmes[0].read_timeout_seconds: not a number of seconds"),
    ("negative expiry", lambda d: d["this_kme"].update(key_expiry_seconds=-1),
     "this_kme.key_expiry_seconds: not a number of seconds"),
    ("shared key directory", lambda d: d["other_kmes"][0].update(key_directory_to_watch="keys"),
     "other_kmes: two links share one key_directory_to_watch"),
    ("route to itself", lambda d: d.update(routes=[{"kme_id": 1, "via": 2}]),
     "routes[0].kme_id: KME 1 is this KME: a route to itself is a loop"),
    ("route through itself", lambda d: d.update(routes=[{"kme_id": 5, "via": 1}]),
     "routes[0].via: KME 1 is this KME: the route would loop here"),
    ("route to a neighbour", lambda d: d.update(routes=[{"kme_id": 2, "via": 2}]),
     "routes[0].kme_id: KME 2 is linked to this KME (other_kmes): keys go there directly"),
    ("next hop not a neighbour", lambda d: d.update(routes=[{"kme_id": 5, "via": 4}]),
     "routes[0].via: KME 4 is not linked to this KME (the next hop must be one of other_kmes)"),
    ("two routes to one KME", lambda d: d.update(routes=[{"kme_id": 5, "via": 2}, {"kme_id": 5, "via": 2}]),
     "routes[1].kme_id: a second route to KME 5"),
    ("route without its next hop", lambda d: d.update(routes=[{"kme_id": 5}]), "routes[0].via: missing"),
]


@pytest.mark.parametrize("case, change, expected", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_names_its_field(config_file, case, change, expected):
    assert error_of(edit(config_file, change)).startswith(expected)


def test_invalid_json_is_one_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"this_kme": {')
    assert "not valid JSON or JSON5" in error_of(path)


def test_missing_file_is_one_line(tmp_path):
    assert "cannot read" in error_of(tmp_path / "absent.json")


def test_db_uri_alias_and_memory(config_file):
    edit(config_file, lambda d: (d["this_kme"].pop("sqlite_db_path"), d["this_kme"].update(db_uri=":memory:")))
    assert load_config(config_file).in_memory


def test_a_postgresql_uri_keeps_its_password_and_takes_its_passfile_from_the_config_folder(config_file):
    edit(config_file, lambda d: (d["this_kme"].pop("sqlite_db_path"), d["this_kme"].update(
        db_uri="postgresql://kme:s3cret@db1.example:5433/kme?passfile=pgpass&sslmode=verify-full")))
    uri = make_url(load_config(config_file).this_kme.database_uri)
    assert (uri.drivername, uri.password, uri.host, uri.port, uri.database) == (
        "postgresql+psycopg", "s3cret", "db1.example", 5433, "kme")
    assert uri.query == {"passfile": str(config_file.parent / "pgpass"), "sslmode": "verify-full"}
    uri = uri.render_as_string(hide_password=False)
    assert "s3cret" not in database_uris.describe(uri) and "db1.example:5433/kme" in database_uris.describe(uri)


def test_kme_config_unset(monkeypatch):
    monkeypatch.delenv("KME_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="KME_CONFIG: not set"):
        load_config()


def test_routes_let_saes_belong_to_kmes_without_a_link(config_file):
    config = load_config(edit(config_file, lambda d: (d.update(routes=[{"kme_id": 5, "via": 2}]),
                                                      d["saes"].append({"id": 7, "kme_id": 5}))))
    assert config.routes == ((5, 2),)
    assert config.next_hop(5).id == config.next_hop(2).id == 2 and config.next_hop(9) is None


def test_a_routing_loop_stops_the_kme_at_start_with_one_line(config_file):
    edit(config_file, lambda d: d.update(routes=[{"kme_id": 1, "via": 2}]))
    result = run_cli(["kme-status"], config_file)
    assert result.returncode != 0
    assert result.stderr.strip() == "kme: routes[0].kme_id: KME 1 is this KME: a route to itself is a loop"


def test_cli_prints_one_line_and_fails(config_file):
    edit(config_file, lambda d: d["other_kmes"][0].pop("inter_kme_bind_address"))
    result = run_cli(["ingest-keys"], config_file)
    assert result.returncode != 0
    assert result.stderr.strip() == "kme: other_kmes[0].inter_kme_bind_address: missing"


def test_gunicorn_prints_one_line_and_fails(config_file):
    edit(config_file, lambda d: d.update(extra=1))
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "deploy/sae.py", "wsgi:sae_app"], cwd=ROOT,
                            env=bare_environment(config_file), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "kme: extra: unknown field" in result.stderr
    assert "Traceback" not in result.stderr


def test_gunicorn_names_every_bad_id_on_a_line_of_its_own(config_file):
    def two_bad(data):
        data["this_kme"]["id"] = "kme/1"
        data["saes"][2]["id"] = "CONS B"

    edit(config_file, two_bad)
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "deploy/sae.py", "wsgi:sae_app"], cwd=ROOT,
                            env=bare_environment(config_file), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "kme: saes[2].id: not an ID (an integer from 0 to 2^63-1" in result.stderr
    assert "\nkme: this_kme.id: not an ID (an integer from 0 to 2^63-1" in result.stderr


def test_the_skip_interface_without_its_configuration_says_so(config_file):
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "deploy/skip.py", "wsgi:skip_app"], cwd=ROOT,
                            env=bare_environment(config_file), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and result.stderr.strip().endswith("kme: this_kme.skip_https_interface: missing")


def test_gunicorn_refuses_an_in_memory_database(config_file):
    edit(config_file, lambda d: d["this_kme"].update(sqlite_db_path=":memory:"))
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "deploy/sae.py", "wsgi:sae_app"], cwd=ROOT,
                            env=bare_environment(config_file), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and ":memory:" in result.stderr and "Traceback" not in result.stderr


def two_cas(config_file, pki) -> None:
    """The SAE interface's CA file with a second CA appended (that of the KMEs)."""
    both = config_file.parent / "two-cas.crt"
    both.write_bytes((pki.folder / "kme1" / "ca_saes.crt").read_bytes() + (pki.folder / "kme1" / "ca_kmes.crt")
                     .read_bytes())
    edit(config_file, lambda d: d["this_kme"]["saes_https_interface"].update(ca_client_cert_path=str(both)))


def test_a_client_ca_file_with_a_second_ca_is_refused_unless_asked_for(config_file, pki):
    """SAEs are known by their serial alone: a second CA could issue a certificate with SAE 1's serial."""
    two_cas(config_file, pki)
    assert error_of(config_file).startswith(
        f"this_kme.saes_https_interface.ca_client_cert_path: {config_file.parent / 'two-cas.crt'} holds 2 "
        "certificates; clients are known by their certificate's serial number, which any CA of the file could issue")
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "deploy/sae.py", "wsgi:sae_app"], cwd=ROOT,
                            env=bare_environment(config_file), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "holds 2 certificates" in result.stderr and "Traceback" not in result.stderr
    edit(config_file, lambda d: d["this_kme"]["saes_https_interface"].update(several_client_cas=True))
    assert load_config(config_file).this_kme.saes_https_interface.ca_client_cert_path.name == "two-cas.crt"


def test_the_metrics_folder_is_made_owner_only(config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("KME_RUNTIME_DIR", str(tmp_path / "runtime"))
    assert run_cli(["kme-status"], config_file).returncode == 0
    (folder,) = (tmp_path / "runtime").iterdir()
    assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a folder to another user (root only, as in CI)")
def test_a_metrics_folder_of_another_user_is_refused(config_file, tmp_path, monkeypatch):
    """Another user could create the default folder in /dev/shm first and feed the KME's metrics."""
    monkeypatch.setenv("KME_RUNTIME_DIR", str(tmp_path / "runtime"))
    folder = load_config(config_file).this_kme.metrics_directory
    folder.mkdir(parents=True)
    os.chown(folder, 65534, 65534)
    result = run_cli(["kme-status"], config_file)
    assert result.returncode != 0
    assert result.stderr.strip() == (f"kme: this_kme.metrics_directory: {folder} belongs to uid 65534, not to this "
                                     "KME (uid 0): remove it, or name another folder")
    os.chown(folder, 0, 0)
    folder.chmod(0o777)
    assert "may be written by other users (mode 777)" in run_cli(["kme-status"], config_file).stderr
