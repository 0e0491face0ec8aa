"""Key-encryption keys: each source (file, generated file, systemd credential, PKCS#11 token on SoftHSM2), their
refusals, and the wrapping of the data key."""
import base64
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading

import pytest

from kme.config import KekSource, load_config
from kme.errors import ConfigError
from kme.storage import kek
from kme.storage.kek import KekError, open_kek, read_key_file, write_key_file
from tests.support import (
    ROOT,
    keys_found,
    run_cli,
    sae_port,
    sae_session,
    start_sae_interface,
    stored_bytes,
    write_config,
    write_keys,
)

# A key-encryption key's sources and refusals sit above the storage layer: the wrapped data key and the sealed keys
# are stored and read on each engine in test_at_rest.py.
pytestmark = pytest.mark.one_engine

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "1234"


def key_file(path, content: bytes, mode: int = 0o600):
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_a_file_holds_32_bytes_or_64_hex_digits(tmp_path):
    raw = os.urandom(32)
    assert read_key_file(key_file(tmp_path / "raw", raw)) == raw
    assert read_key_file(key_file(tmp_path / "hex", raw.hex().encode() + b"\n")) == raw
    for content in (b"", os.urandom(31), b"zz" * 32, raw.hex().encode()[:-2]):
        with pytest.raises(KekError, match="neither 32 bytes nor 64 hexadecimal digits"):
            read_key_file(key_file(tmp_path / "bad", content))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_file_others_may_read_is_refused(tmp_path, mode):
    with pytest.raises(KekError, match=f"may be read by others \\(mode {mode:o}\\); chmod 600"):
        read_key_file(key_file(tmp_path / "kek", os.urandom(32), mode))


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(KekError, match="does not exist"):
        open_kek(KekSource("file", path=tmp_path / "nowhere"))


def test_a_generated_file_is_owner_only_and_made_once(tmp_path):
    source = KekSource("generated", path=tmp_path / "kme.kek")
    first, created = open_kek(source)
    assert created and (source.path.stat().st_mode & 0o777) == 0o600
    again, created_again = open_kek(source)
    assert not created_again
    wrapped = first.wrap(b"d" * 32, b"db")
    assert again.unwrap(wrapped, b"db") == b"d" * 32


def test_processes_generating_at_once_end_with_one_key(tmp_path):
    path = tmp_path / "kme.kek"
    outcomes, start = [], threading.Barrier(8)

    def generate():
        start.wait()
        outcomes.append(write_key_file(path))

    threads = [threading.Thread(target=generate) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [False] * 7 + [True]
    assert len(read_key_file(path)) == 32
    assert [entry.name for entry in tmp_path.iterdir()] == ["kme.kek"]


def test_a_credential_is_read_from_the_credentials_directory(tmp_path, monkeypatch):
    source = KekSource("credential", name="kek")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(KekError, match="CREDENTIALS_DIRECTORY is not set"):
        open_kek(source)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(KekError, match="does not exist"):
        open_kek(source)
    key_file(tmp_path / "kek", os.urandom(32), 0o400)
    opened, _ = open_kek(source)
    assert opened.unwrap(opened.wrap(b"x" * 32, b"db"), b"db") == b"x" * 32


def test_a_data_key_opens_only_under_its_kek_and_for_its_database(tmp_path):
    one, _ = open_kek(KekSource("file", path=key_file(tmp_path / "one", os.urandom(32))))
    two, _ = open_kek(KekSource("file", path=key_file(tmp_path / "two", os.urandom(32))))
    wrapped = one.wrap(b"k" * 32, kek.context(b"db-1"))
    with pytest.raises(KekError, match="does not open this database's data key"):
        two.unwrap(wrapped, kek.context(b"db-1"))
    with pytest.raises(KekError, match="does not open"):
        one.unwrap(wrapped, kek.context(b"db-2"))
    with pytest.raises(KekError, match="not in a format"):
        one.unwrap(wrapped[:20], kek.context(b"db-1"))


@pytest.mark.parametrize("value, expected", [
    ("credential:", "credential: needs the name"),
    ("credential:a/b", "credential: needs the name"),
    ("pkcs11:token=t;object=k", "needs module-path="),
    ("pkcs11:object=k?module-path=/m.so", "needs token="),
    ("pkcs11:token=t;object=k;id=%01?module-path=/m.so", "attribute id is not supported"),
    ("pkcs11:token=t;object=k;type=private?module-path=/m.so", "must name a secret key"),
    ("pkcs11:token=t;object=k?module-path=/m.so&pin-value=1&pin-source=/p", "pin-source or pin-value"),
    ("pkcs11:token;object=k?module-path=/m.so", "is not an attribute=value"),
])
def test_each_mistake_in_the_field_is_one_line(tmp_path, pki, value, expected):
    config = write_config(tmp_path, pki, key_encryption_key=value)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(config)
    assert str(caught.value).startswith("this_kme.key_encryption_key: ")


def test_the_field_names_each_kind_of_source(tmp_path, pki):
    def source(value):
        return load_config(write_config(tmp_path, pki, key_encryption_key=value)).this_kme.key_encryption_key

    assert source("secret/kek") == KekSource("file", path=tmp_path / "secret" / "kek")
    assert source("credential:kme-kek") == KekSource("credential", name="kme-kek")
    hsm = source("pkcs11:token=My%20HSM;object=kek?module-path=/lib/p.so&pin-source=file:pin")
    assert (hsm.kind, hsm.token, hsm.name, hsm.module, hsm.pin_source) == (
        "pkcs11", "My HSM", "kek", "/lib/p.so", tmp_path / "pin")
    assert "PIN" not in hsm.describe() and "pin" not in hsm.describe()
    default = load_config(write_config(tmp_path, pki)).this_kme.key_encryption_key
    assert default == KekSource("generated", path=tmp_path / "config.kek")
    memory = load_config(write_config(tmp_path, pki, sqlite_db_path=":memory:")).this_kme.key_encryption_key
    assert memory.kind == "ephemeral"


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """A SoftHSM2 token "kme" holding the AES key "kme-kek", for the whole session (the module is loaded once)."""
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "kme", "--pin", PIN, "--so-pin", "5678"],
                   check=True, capture_output=True)
    import pkcs11
    from pkcs11 import Attribute, KeyType

    token = pkcs11.lib(SOFTHSM_MODULE).get_token(token_label="kme")
    with token.open(user_pin=PIN, rw=True) as session:
        session.generate_key(KeyType.AES, 256, label="kme-kek", store=True,
                             template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
    pin = folder / "pin"
    pin.write_text(PIN + "\n")
    pin.chmod(0o600)
    return folder, f"pkcs11:token=kme;object=kme-kek?module-path={SOFTHSM_MODULE}&pin-source={pin}"


def test_a_softhsm2_key_wraps_and_a_wrong_pin_or_label_is_one_line(softhsm, tmp_path, pki):
    _, uri = softhsm
    source = load_config(write_config(tmp_path, pki, key_encryption_key=uri)).this_kme.key_encryption_key
    opened, _ = open_kek(source)
    wrapped = opened.wrap(b"k" * 32, kek.context(b"db"))
    assert opened.unwrap(wrapped, kek.context(b"db")) == b"k" * 32
    with pytest.raises(KekError, match="does not open"):
        opened.unwrap(wrapped, kek.context(b"other"))
    for value, expected in ((f"pkcs11:token=kme;object=kme-kek?module-path={SOFTHSM_MODULE}&pin-value=0000",
                             "refused the PIN"),
                            (f"pkcs11:token=kme;object=nope?module-path={SOFTHSM_MODULE}&pin-value={PIN}",
                             "no AES key labelled 'nope'"),
                            (f"pkcs11:token=none;object=kme-kek?module-path={SOFTHSM_MODULE}&pin-value={PIN}",
                             "no PKCS#11 token labelled 'none'")):
        bad = load_config(write_config(tmp_path, pki, key_encryption_key=value)).this_kme.key_encryption_key
        with pytest.raises(KekError, match=expected):
            open_kek(bad)


def test_a_pin_file_others_may_read_is_refused(softhsm, tmp_path, pki):
    folder, uri = softhsm
    loose = tmp_path / "pin"
    loose.write_text(PIN + "\n")
    loose.chmod(0o644)
    source = load_config(write_config(tmp_path, pki, key_encryption_key=uri.replace(
        str(folder / "pin"), str(loose)))).this_kme.key_encryption_key
    with pytest.raises(KekError, match=f"the PIN file {loose} may be read by others \\(mode 644\\)"):
        open_kek(source)


def _wrap_and_unwrap(source: KekSource, rounds: int) -> str | None:
    """In a process of its own: open the KEK and wrap and unwrap ``rounds`` times; what failed, or None."""
    try:
        opened, _ = open_kek(source)
        for _ in range(rounds):
            if opened.unwrap(opened.wrap(b"k" * 32, kek.context(b"db")), kek.context(b"db")) != b"k" * 32:
                return "a different key came back"
    except KekError as exc:
        return str(exc)
    return None


def test_processes_using_one_softhsm2_token_at_once_all_succeed(softhsm, tmp_path, pki):
    # SoftHSM2 rewrites its token file at each login: without calling again, workers of one KME starting or
    # serving together failed with "the PKCS#11 token 'kme' failed (GeneralError)".
    _, uri = softhsm
    source = load_config(write_config(tmp_path, pki, key_encryption_key=uri)).this_kme.key_encryption_key

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        failures = pool.starmap(_wrap_and_unwrap, [(source, 30)] * 8)

    assert failures == [None] * 8


def _kek_on_a_new_token(folder, tmp_path, pki, label: str):
    """A KEK on a new SoftHSM2 token ``label`` holding its AES key: (the KEK opened, the token's folder, the
    module)."""
    before = set((folder / "tokens").iterdir())
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "5678"],
                   check=True, capture_output=True)
    import pkcs11
    from pkcs11 import Attribute, KeyType

    library = pkcs11.lib(SOFTHSM_MODULE)
    library.reinitialize()
    with library.get_token(token_label=label).open(user_pin=PIN, rw=True) as session:
        session.generate_key(KeyType.AES, 256, label="kme-kek", store=True,
                             template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
    value = f"pkcs11:token={label};object=kme-kek?module-path={SOFTHSM_MODULE}&pin-value={PIN}"
    opened, _ = open_kek(load_config(write_config(tmp_path, pki, key_encryption_key=value)).this_kme.key_encryption_key)
    (token_folder,) = set((folder / "tokens").iterdir()) - before
    return opened, token_folder, library


def test_a_token_that_fails_is_named_as_the_token_not_as_a_wrong_key(softhsm, tmp_path, pki):
    """SoftHSM2 reports a tag that does not verify and a token gone alike (GeneralError): the KME tells them
    apart, so that an operator is not told to look for another key when the token failed."""
    folder, _ = softhsm
    opened, token_folder, library = _kek_on_a_new_token(folder, tmp_path, pki, "gone")
    wrapped = opened.wrap(b"k" * 32, kek.context(b"db"))
    with pytest.raises(KekError, match="does not open"):
        opened.unwrap(wrapped, kek.context(b"other"))
    shutil.rmtree(token_folder)
    try:
        with pytest.raises(KekError, match=r"the PKCS#11 token 'gone' failed \(\w+\): is it present and working\?"):
            opened.unwrap(wrapped, kek.context(b"db"))
    finally:
        # The module forgets the token it lost, for the tests after this one.
        library.reinitialize()


def test_a_token_missing_from_one_reading_of_the_slots_is_looked_up_again(softhsm, tmp_path, pki, monkeypatch):
    waits = []

    def token_appears(seconds):
        # While the KME waits to read the slots again, the token comes into being (as a file another process
        # was rewriting reappears).
        waits.append(seconds)
        if len(waits) == 1:
            subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "late", "--pin", PIN,
                            "--so-pin", "5678"], check=True, capture_output=True)

    monkeypatch.setattr(kek.time, "sleep", token_appears)
    value = f"pkcs11:token=late;object=kme-kek?module-path={SOFTHSM_MODULE}&pin-value={PIN}"
    source = load_config(write_config(tmp_path, pki, key_encryption_key=value)).this_kme.key_encryption_key
    # Found at the second reading: what is missing now is the key on it, not the token.
    with pytest.raises(KekError, match="no AES key labelled 'kme-kek' on the PKCS#11 token 'late'"):
        open_kek(source)
    assert waits == [0.05]


def test_a_call_that_fails_is_made_again_on_the_token_read_afresh(softhsm, tmp_path, pki, monkeypatch):
    """A process that read a token file another one was rewriting keeps a wrong view of the token (SoftHSM2
    failed UserPinNotInitialized at every try under load) until the module reads its slots again."""
    folder, _ = softhsm
    opened, token_folder, library = _kek_on_a_new_token(folder, tmp_path, pki, "moved")
    wrapped = opened.wrap(b"k" * 32, kek.context(b"db"))
    aside = tmp_path / "aside"
    token_folder.rename(aside)
    waits = []

    def token_back(seconds):
        waits.append(seconds)
        if len(waits) == 1:
            aside.rename(token_folder)

    monkeypatch.setattr(kek.time, "sleep", token_back)
    try:
        assert opened.unwrap(wrapped, kek.context(b"db")) == b"k" * 32
        assert len(waits) == 1
    finally:
        shutil.rmtree(token_folder)
        library.reinitialize()


def test_a_kme_under_gunicorn_keeps_its_keys_under_a_softhsm2_key(softhsm, tmp_path, pki):
    """Round trip through real workers, each opening the token after the fork."""
    _, uri = softhsm
    config = write_config(tmp_path, pki, key_encryption_key=uri)
    data = write_keys(tmp_path / "keys" / "a.cor", 8)
    assert run_cli(["ingest-keys"], config).returncode == 0
    assert not (tmp_path / "config.kek").exists()
    server = start_sae_interface(config, tmp_path / "sae.log")
    try:
        session = sae_session(pki, 1, 1)
        url = f"https://127.0.0.1:{sae_port(config)}/api/v1/keys"
        key = session.post(f"{url}/2/enc_keys", json={"number": 1}, timeout=10).json()["keys"][0]
        fetched = sae_session(pki, 1, 2).post(f"{url}/1/dec_keys", json={"key_IDs": [{"key_ID": key["key_ID"]}]},
                                              timeout=10).json()["keys"][0]
        assert fetched == key
        assert base64.b64decode(key["key"]) == data[:32]
        health = session.get(f"https://127.0.0.1:{sae_port(config)}/healthz", timeout=10).json()
        assert health["encryption_at_rest"]["key_encryption_key"] == "PKCS#11 key 'kme-kek' on token 'kme' " \
            f"(module {SOFTHSM_MODULE})"
    finally:
        server.stop()
    assert not keys_found(stored_bytes(tmp_path / "kme.db"), data)


def test_a_token_that_refuses_stops_gunicorn_with_one_line_before_any_worker(softhsm, tmp_path, pki):
    """The master tries the token in a spawned process (PKCS#11 is not fork-safe), so no worker is ever forked."""
    uri = f"pkcs11:token=kme;object=kme-kek?module-path={SOFTHSM_MODULE}&pin-value=0000"
    config = write_config(tmp_path, pki, key_encryption_key=uri)
    with pytest.raises(RuntimeError) as caught:
        start_sae_interface(config, tmp_path / "sae.log")
    output = str(caught.value)
    assert "kme: this_kme.key_encryption_key: the PKCS#11 token 'kme' refused the PIN" in output
    assert "Traceback" not in output and "Booting worker" not in output


def test_a_worker_that_cannot_open_the_token_exits_with_gunicorns_boot_error(softhsm, tmp_path, pki, monkeypatch):
    """Should the token refuse a worker after the master's check, the worker stops gunicorn instead of looping."""
    uri = f"pkcs11:token=kme;object=kme-kek?module-path={SOFTHSM_MODULE}&pin-value=0000"
    config = write_config(tmp_path, pki, key_encryption_key=uri)
    monkeypatch.setenv("KME_CONFIG", str(config))
    result = subprocess.run([sys.executable, "-c", "import wsgi; wsgi.sae_app"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3
    assert result.stderr.strip() == "kme: this_kme.key_encryption_key: the PKCS#11 token 'kme' refused the PIN"
