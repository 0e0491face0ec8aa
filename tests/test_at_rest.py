"""Encryption at rest on a real KME: gunicorn, TLS, the SQLite file and its WAL searched byte for byte.

No key byte string of the ingested files is ever in the database or its
WAL; a wrong, missing or loosely kept KEK stops every process with one
line; altered rows are refused and change nothing; rotating the KEK and
sealing a database from before encryption at rest lose nothing under load.
"""
import base64
import hashlib
import os
import struct
import threading

import pytest

from kme import create_app
from kme.config import load_config
from kme.storage.sealing import OVERHEAD, histogram_place, pool_place, secret_place
from tests.support import (
    Ledger,
    checkpoint,
    keys_found,
    run_cli,
    sae_port,
    sae_session,
    start_ingest_worker,
    start_sae_interface,
    stored_bytes,
    wait_until,
    write_config,
    write_keys,
)


class Kme:
    """A KME folder: configuration (generated KEK beside it), database, key file; processes started on demand."""

    def __init__(self, tmp_path, pki, keys=64, **extra):
        self.folder = tmp_path
        self.config = write_config(tmp_path, pki, **extra)
        self.data = write_keys(tmp_path / "keys" / "a.cor", keys)
        self.db = tmp_path / "kme.db"
        self.kek = tmp_path / "config.kek"
        self.ledger = Ledger(self.db)
        self.pki = pki
        self.server = None

    def ingest(self):
        result = run_cli(["ingest-keys"], self.config)
        assert result.returncode == 0, result.stderr
        return result

    def start(self):
        self.server = start_sae_interface(self.config, self.folder / "sae.log")
        self.url = f"https://127.0.0.1:{sae_port(self.config)}"
        return self.server

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None

    def enc(self, number=1, size=256):
        return sae_session(self.pki, 1, 1).post(f"{self.url}/api/v1/keys/2/enc_keys",
                                                json={"number": number, "size": size}, timeout=10)

    def dec(self, key_ids):
        return sae_session(self.pki, 1, 2).post(f"{self.url}/api/v1/keys/1/dec_keys",
                                                json={"key_IDs": [{"key_ID": key_id} for key_id in key_ids]},
                                                timeout=10)

    def snapshot(self) -> tuple:
        return self.ledger.snapshot()


@pytest.fixture
def kme(tmp_path, pki):
    node = Kme(tmp_path, pki)
    yield node
    node.stop()


def test_no_key_is_in_the_database_or_its_wal_before_or_after_delivery(kme):
    first = kme.ingest()
    assert first.stderr.count(f"generated the key-encryption key file {kme.kek}") == 1
    assert "generated" not in kme.ingest().stderr
    assert (kme.kek.stat().st_mode & 0o777) == 0o600
    assert keys_found(stored_bytes(kme.db), kme.data) == []
    kme.start()
    keys = kme.enc(number=4, size=512).json()["keys"]
    delivered = [base64.b64decode(key["key"]) for key in keys]
    waiting = [row[0] for row in kme.ledger._query("SELECT material FROM delivered_keys")]
    assert len(waiting) == 4
    raw = stored_bytes(kme.db)
    assert keys_found(raw, kme.data) == [] and not any(key in raw for key in delivered)
    assert kme.dec([key["key_ID"] for key in keys]).status_code == 200
    kme.stop()
    checkpoint(kme.db)
    raw = stored_bytes(kme.db)
    assert keys_found(raw, kme.data) == [] and not any(key in raw for key in delivered)
    assert kme.ledger.assert_exact(1)["delivered"] == 8


def test_the_fingerprint_secret_is_sealed_and_one_kept_in_clear_is_sealed_in_place(kme):
    """Whoever copies the database must not be able to test guessed keys against the fingerprints of every key
    ever ingested: the secret that keys them is sealed under the data key like the keys."""
    kme.ingest()
    query = "SELECT value FROM kme_meta WHERE name = 'fingerprint_secret'"
    ((stored,),) = kme.ledger._query(query)
    assert len(stored) == 32 + OVERHEAD
    secret = kme.ledger.sealer().open(stored, secret_place(), lambda: "the fingerprint secret")
    (first,) = struct.unpack(">q", hashlib.blake2b(kme.data[:32], key=secret, digest_size=8).digest())
    assert kme.ledger._query("SELECT COUNT(*) FROM key_fingerprints WHERE fingerprint = ?", first) == [(1,)]
    assert secret not in stored_bytes(kme.db)
    # As a KME before this release kept it: in clear. The next process seals it in place, the same secret.
    kme.ledger.write(("UPDATE kme_meta SET value = ? WHERE name = 'fingerprint_secret'", secret))
    kme.ingest()
    ((stored,),) = kme.ledger._query(query)
    assert len(stored) == 32 + OVERHEAD
    assert kme.ledger.sealer().open(stored, secret_place(), lambda: "the fingerprint secret") == secret
    # The fingerprints still know every key: the same material under another name is refused.
    (kme.folder / "keys" / "copy.cor").write_bytes(kme.data)
    kme.ingest()
    assert kme.ledger.assert_exact(1)["ingested"] == 64


@pytest.mark.sqlite_only
def test_a_delivered_keys_ciphertext_leaves_the_file_and_its_wal_once_fetched(kme):
    kme.ingest()
    kme.start()
    keys = kme.enc(number=4, size=512).json()["keys"]
    waiting = [row[0] for row in kme.ledger._query("SELECT material FROM delivered_keys")]
    assert len(waiting) == 4 and all(sealed in stored_bytes(kme.db) for sealed in waiting)
    assert kme.dec([key["key_ID"] for key in keys]).status_code == 200
    kme.stop()
    checkpoint(kme.db)
    raw = stored_bytes(kme.db)
    assert not any(sealed in raw for sealed in waiting), "a delivered key's ciphertext outlived its delivery"


def test_every_surface_says_encryption_is_on_and_where_the_kek_is(kme):
    kme.ingest()
    status = run_cli(["kme-status"], kme.config)
    assert f"encryption at rest: on, keys sealed; key-encryption key: generated file {kme.kek}" in status.stdout
    kme.start()
    health = sae_session(kme.pki, 1, 1).get(f"{kme.url}/healthz", timeout=10).json()
    assert health["encryption_at_rest"] == {"on": True, "keys": "sealed", "key_encryption_key":
                                            f"generated file {kme.kek} (move it to other storage, see "
                                            "docs/security.md)"}
    page = create_app(load_config(kme.config), interface="debug").test_client().get("/").get_data(as_text=True)
    assert "Encryption at rest: on, keys sealed; key-encryption key:" in page
    secret = kme.kek.read_text().strip()
    assert secret not in page and secret not in status.stdout and secret not in str(health)


def assert_refused_in_one_line(process_output: str, expected: str):
    assert expected in process_output, process_output
    assert "Traceback" not in process_output, process_output


def test_a_wrong_kek_stops_every_process_with_one_line_and_changes_nothing(kme):
    kme.ingest()
    before = kme.snapshot()
    kme.kek.write_text(os.urandom(32).hex() + "\n")
    expected = "does not open this database's data key"
    with pytest.raises(RuntimeError) as caught:
        kme.start()
    assert_refused_in_one_line(str(caught.value), "kme: this_kme.key_encryption_key: the key-encryption key")
    assert expected in str(caught.value)
    for command in (["ingest-keys"], ["kme-status"], ["encrypt-db"], ["adopt-key-folders", "--existing", "new"]):
        result = run_cli(command, kme.config)
        assert result.returncode != 0
        assert_refused_in_one_line(result.stderr, expected)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    with pytest.raises(RuntimeError) as caught:
        start_ingest_worker(kme.config, kme.folder / "ingest.log")
    assert_refused_in_one_line(str(caught.value), expected)
    assert kme.snapshot() == before


def test_a_kek_file_others_may_read_or_a_lost_one_stops_the_kme(kme):
    kme.ingest()
    kme.kek.chmod(0o644)
    with pytest.raises(RuntimeError) as caught:
        kme.start()
    assert_refused_in_one_line(str(caught.value), "may be read by others (mode 644); chmod 600 it")
    result = run_cli(["ingest-keys"], kme.config)
    assert result.returncode != 0 and "may be read by others" in result.stderr
    kme.kek.unlink()
    with pytest.raises(RuntimeError) as caught:
        kme.start()
    # Never a fresh key beside a database it cannot open.
    assert_refused_in_one_line(str(caught.value), "does not exist, and the database")
    assert not kme.kek.exists()


def swap_first_two(ledger):
    (a, ma), (b, mb) = ledger._query("SELECT id, material FROM pool_keys ORDER BY id LIMIT 2")
    ledger.write(("UPDATE pool_keys SET material = ? WHERE id = ?", mb, a),
                 ("UPDATE pool_keys SET material = ? WHERE id = ?", ma, b))


def truncate_first(ledger):
    (first, material), = ledger._query("SELECT id, material FROM pool_keys ORDER BY id LIMIT 1")
    ledger.write(("UPDATE pool_keys SET material = ? WHERE id = ?", material[:-1], first))


def clear_first(ledger):
    ledger.write(("UPDATE pool_keys SET material = ? WHERE id = (SELECT min(id) FROM pool_keys)", os.urandom(32)))


@pytest.mark.parametrize("alter, expected", [
    (swap_first_two, "does not open under this database's data key"),
    (truncate_first, "does not open under this database's data key"),
    (clear_first, "is stored in clear in an encrypted database"),
])
def test_an_altered_row_is_refused_and_changes_nothing(kme, alter, expected):
    kme.ingest()
    alter(kme.ledger)
    checkpoint(kme.db)
    before = (kme.snapshot(), kme.ledger.link(1))
    kme.start()
    answer = kme.enc(number=2)
    assert answer.status_code == 503
    message = answer.json()["message"]
    assert message.startswith("key data access error: pool key ") and expected in message
    kme.stop()
    checkpoint(kme.db)
    assert (kme.snapshot(), kme.ledger.link(1)) == before


def test_key_files_whose_names_were_swapped_serve_nothing(kme):
    """Peers name a key by its file's name: a key sealed for one name does not open under another, so swapped
    names can never make two requests name different keys by one material (or one key by two names)."""
    write_keys(kme.folder / "keys" / "b.cor", 64)
    kme.ingest()
    kme.ledger.write(("UPDATE key_files SET name = 'swap' WHERE name = 'a.cor'",),
                     ("UPDATE key_files SET name = 'a.cor' WHERE name = 'b.cor'",),
                     ("UPDATE key_files SET name = 'b.cor' WHERE name = 'swap'",))
    checkpoint(kme.db)
    before = (kme.snapshot(), kme.ledger.link(1))
    kme.start()
    answer = kme.enc(number=2)
    assert answer.status_code == 503
    assert answer.json()["message"] == (
        "key data access error: pool key 0 of key file b.cor on link 1 does not open under this database's data key "
        "(moved, altered or truncated outside the KME)")
    kme.stop()
    checkpoint(kme.db)
    assert (kme.snapshot(), kme.ledger.link(1)) == before


def test_a_slave_added_to_a_waiting_key_outside_the_kme_gets_nothing(kme):
    """The key is sealed for the slaves it was made for: a row of key_slaves added by someone who can write the
    database, but has no KEK, makes the key refuse to open, for that slave and every other."""
    kme.ingest()
    kme.start()
    (key,) = kme.enc().json()["keys"]
    kme.ledger.write(("INSERT INTO key_slaves (key_id, slave_sae_id, fetched) VALUES (?, 1, FALSE)", key["key_ID"]))
    checkpoint(kme.db)
    before = kme.snapshot()
    stolen = sae_session(kme.pki, 1, 1).post(f"{kme.url}/api/v1/keys/1/dec_keys",
                                             json={"key_IDs": [{"key_ID": key["key_ID"]}]}, timeout=10)
    assert stolen.status_code == 503
    assert stolen.json()["message"] == (
        f"key data access error: delivered key {key['key_ID']} does not open under this database's data key "
        "(moved, altered or truncated outside the KME)")
    assert kme.dec([key["key_ID"]]).status_code == 503
    kme.stop()
    checkpoint(kme.db)
    assert kme.snapshot() == before


class Load:
    """SAE 1 asks for keys and SAE 2 fetches each, in a thread, until stopped; every answer is kept."""

    def __init__(self, kme: Kme):
        self.kme, self.stop, self.failures, self.delivered = kme, threading.Event(), [], {}
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        master, slave = sae_session(self.kme.pki, 1, 1), sae_session(self.kme.pki, 1, 2)
        url = f"{self.kme.url}/api/v1/keys"
        while not self.stop.is_set():
            answer = master.post(f"{url}/2/enc_keys", json={"number": 2}, timeout=10)
            if answer.status_code != 200:
                self.failures.append(answer.text)
                return
            keys = answer.json()["keys"]
            fetched = slave.post(f"{url}/1/dec_keys", json={"key_IDs": [{"key_ID": key["key_ID"]} for key in keys]},
                                 timeout=10)
            if fetched.status_code != 200 or fetched.json()["keys"] != keys:
                self.failures.append(fetched.text)
                return
            self.delivered.update((key["key_ID"], key["key"]) for key in keys)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join(30)
        assert self.failures == []
        return self.delivered


def assert_every_key_once(kme: Kme, delivered: dict, ledger: Ledger):
    """Each delivered key is a distinct key of the file; the pool holds exactly the others."""
    pieces = [base64.b64decode(key) for key in delivered.values()]
    positions = [kme.data.find(piece) // 32 for piece in pieces]
    assert -1 not in positions and len(set(positions)) == len(positions)
    left = {position for position, _material in ledger.pool_keys()}
    assert left.isdisjoint(positions) and len(left) + len(positions) == len(kme.data) // 32
    for position, material in ledger.pool_keys():
        assert material == kme.data[position * 32:(position + 1) * 32]
    counts = ledger.assert_exact(1)
    assert counts["delivered"] == len(positions)


def test_rotating_the_kek_under_load_loses_nothing(tmp_path, pki):
    kme = Kme(tmp_path, pki, keys=4000)
    kme.ingest()
    kme.start()
    try:
        (waiting,) = kme.enc().json()["keys"]
        load = Load(kme)
        wait_until(lambda: len(load.delivered) >= 20 or load.failures, timeout=30)
        new = tmp_path / "new.kek"
        new.write_text(os.urandom(32).hex())
        new.chmod(0o600)
        rotated = run_cli(["rotate-kek", "--new-kek", str(new)], kme.config)
        assert rotated.returncode == 0, rotated.stderr
        assert f"now wrapped under file {new}" in rotated.stdout
        again = run_cli(["rotate-kek", "--new-kek", str(new)], kme.config)
        assert again.returncode == 0 and "already wrapped" in again.stdout and "nothing to do" in again.stdout
        count = len(load.delivered)
        wait_until(lambda: len(load.delivered) >= count + 20 or load.failures, timeout=30)
        delivered = load.finish()
    finally:
        kme.stop()
    # During the change a process started with the previous key still serves (a gunicorn master forking a worker
    # again before the configuration names the new key).
    kme.start()
    (during,) = kme.enc().json()["keys"]
    kme.stop()
    finished = run_cli(["rotate-kek", "--finish"], kme.config)
    assert finished.returncode == 0 and "the previous key-encryption key no longer opens" in finished.stdout
    with pytest.raises(RuntimeError) as caught:
        kme.start()
    assert "does not open this database's data key" in str(caught.value)
    kme.config.write_text(kme.config.read_text().replace('"nickname"', f'"key_encryption_key": "{new}", "nickname"'))
    kme.start()
    fetched = kme.dec([waiting["key_ID"]])
    assert fetched.json()["keys"] == [waiting]
    kme.stop()
    delivered[waiting["key_ID"]] = waiting["key"]
    delivered[during["key_ID"]] = during["key"]
    assert_every_key_once(kme, delivered, Ledger(kme.db, new))


def make_legacy(kme: Kme) -> None:
    """Turn the database into one a KME from before encryption at rest wrote: material in clear, no data key."""
    ledger = kme.ledger
    sealer = ledger.sealer()
    rows = ledger._query("SELECT p.id, p.link_id, f.name, p.position, p.material FROM pool_keys AS p "
                         "JOIN key_files AS f ON f.id = p.file_id")
    ledger.write_rows("UPDATE pool_keys SET material = ? WHERE id = ?", [
        (sealer.open(material, pool_place(link, name, position), str), key_id)
        for key_id, link, name, position, material in rows])
    links = ledger._query("SELECT peer_kme_id, byte_histogram FROM links")
    ledger.write_rows("UPDATE links SET byte_histogram = ? WHERE peer_kme_id = ?", [
        (histogram if len(histogram) == 2048 else sealer.open(histogram, histogram_place(link), str), link)
        for link, histogram in links])
    ledger.write(("DELETE FROM kme_meta WHERE name = 'data_key'",))
    checkpoint(kme.db)


# Databases from before encryption at rest are SQLite files: PostgreSQL support came later.
@pytest.mark.sqlite_only
def test_a_database_from_before_is_sealed_in_place_under_load_and_resumably(tmp_path, pki):
    kme = Kme(tmp_path, pki, keys=5000)
    kme.ingest()
    make_legacy(kme)
    assert len(keys_found(stored_bytes(kme.db), kme.data)) == 5000
    kme.start()
    try:
        load = Load(kme)
        wait_until(lambda: len(load.delivered) >= 10 or load.failures, timeout=30)
        assert "pool keys from before encryption at rest are still in clear" in \
            sae_session(pki, 1, 1).get(f"{kme.url}/healthz", timeout=10).json()["encryption_at_rest"]["keys"]
        assert "run flask encrypt-db to seal them" in kme.server.output()
        sealed = run_cli(["encrypt-db"], kme.config)
        assert sealed.returncode == 0, sealed.stderr
        assert "sealing pool keys" in sealed.stdout and "no key of the database is in clear" in sealed.stdout
        again = run_cli(["encrypt-db"], kme.config)
        assert again.returncode == 0 and "nothing to do" in again.stdout
        count = len(load.delivered)
        wait_until(lambda: len(load.delivered) >= count + 10 or load.failures, timeout=30)
        delivered = load.finish()
        assert "encryption at rest: on, keys sealed" in run_cli(["kme-status"], kme.config).stdout
        assert sae_session(pki, 1, 1).get(f"{kme.url}/healthz", timeout=10).json()[
            "encryption_at_rest"]["keys"] == "sealed"
        # The workers served clear keys until now; once the database is sealed, a clear key is an alteration.
        (first, sealed), = kme.ledger._query("SELECT id, material FROM pool_keys ORDER BY id LIMIT 1")
        clear_first(kme.ledger)
        answer = kme.enc()
        assert answer.status_code == 503 and "is stored in clear in an encrypted database" in answer.json()["message"]
        kme.ledger.write(("UPDATE pool_keys SET material = ? WHERE id = ?", sealed, first))
    finally:
        kme.stop()
    checkpoint(kme.db)
    assert keys_found(stored_bytes(kme.db), kme.data) == []
    assert_every_key_once(kme, delivered, kme.ledger)


# Databases from before encryption at rest are SQLite files: PostgreSQL support came later.
@pytest.mark.sqlite_only
def test_sealing_stopped_half_way_goes_on_where_it_stood(tmp_path, pki):
    kme = Kme(tmp_path, pki, keys=5000)
    kme.ingest()
    make_legacy(kme)
    app = create_app(load_config(kme.config), interface="cli")
    with app.app_context():
        from kme.storage import at_rest
        from kme.storage.schema import ensure_schema

        ensure_schema()
        count, after = at_rest.encrypt_pool_batch(0)
    assert count == at_rest.ENCRYPT_BATCH
    checkpoint(kme.db)
    assert len(keys_found(stored_bytes(kme.db), kme.data)) == 5000 - count
    result = run_cli(["encrypt-db"], kme.config)
    assert result.returncode == 0 and f"{5000 - count} pool keys sealed" in result.stdout
    checkpoint(kme.db)
    assert keys_found(stored_bytes(kme.db), kme.data) == []
    assert sorted(material for _position, material in kme.ledger.pool_keys()) == sorted(
        kme.data[i:i + 32] for i in range(0, len(kme.data), 32))


def test_rotate_kek_refuses_what_it_cannot_use_and_changes_nothing(kme, tmp_path):
    kme.ingest()
    before = kme.snapshot()
    loose = tmp_path / "loose.kek"
    loose.write_text(os.urandom(32).hex())
    loose.chmod(0o644)
    for new, expected in ((tmp_path / "missing.kek", "--new-kek: the key-encryption key file"),
                          (loose, "may be read by others"),
                          ("pkcs11:token=t;object=k", "--new-kek: this_kme.key_encryption_key: the PKCS#11 URI "
                                                      "needs module-path=")):
        result = run_cli(["rotate-kek", "--new-kek", str(new)], kme.config)
        assert result.returncode != 0 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    # Neither the configured KEK nor the new one opens the database: nothing to rewrap with.
    new = tmp_path / "new.kek"
    new.write_text(os.urandom(32).hex())
    new.chmod(0o600)
    kme.kek.write_text(os.urandom(32).hex())
    result = run_cli(["rotate-kek", "--new-kek", str(new)], kme.config)
    assert result.returncode != 0 and "does not open this database's data key" in result.stderr
    assert kme.snapshot() == before
    memory = write_config(tmp_path / "memory", kme.pki, sqlite_db_path=":memory:")
    result = run_cli(["rotate-kek", "--new-kek", str(new)], memory)
    assert result.returncode != 0 and "an in-memory database has no key-encryption key to rotate" in result.stderr
