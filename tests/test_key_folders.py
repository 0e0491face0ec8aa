"""Key folder marks: both KMEs of a link may read one folder on one host, a replaced database of either is refused.

The layout is that of the example configurations of the Rust KME this
project started from: `raw_keys/kme-1-1`, `raw_keys/kme-2-2` for the zones
and one `raw_keys/kme-1-2` that both KMEs read for their link.
"""
import json

import pytest

from kme.operations import key_folders
from tests.network import Network
from tests.support import load_json, lose_database, run_cli, write_keys

# The marks are files beside the keys; a lost database on PostgreSQL is tested in test_ingest_faults.py.
pytestmark = pytest.mark.one_engine


@pytest.fixture
def shared(tmp_path, pki):
    """KMEs 1 and 2 whose link folder is one `raw_keys/kme-1-2`, not yet started."""
    network = Network(tmp_path / "net", pki, [(1, 2)])
    raw_keys = tmp_path / "raw_keys"
    for name in ("kme-1-1", "kme-2-2", "kme-1-2"):
        (raw_keys / name).mkdir(parents=True)
    for kme_id in (1, 2):
        config = load_json(network[kme_id].config)
        config["this_kme"]["key_directory_to_watch"] = str(raw_keys / f"kme-{kme_id}-{kme_id}")
        config["other_kmes"][0]["key_directory_to_watch"] = str(raw_keys / "kme-1-2")
        network[kme_id].config.write_text(json.dumps(config, indent=2))
    yield network, raw_keys / "kme-1-2"
    network.stop_all()


def test_both_kmes_of_a_link_ingest_the_one_folder_they_share_and_exchange_keys(shared):
    network, folder = shared
    write_keys(folder / "link.cor", 40)
    network.start_all()
    network.wait_for_link(1, 2, 40)
    marks = {path.name: path.read_text().strip() for path in folder.glob(".kme-database*")}
    assert set(marks) == {".kme-database.1", ".kme-database.2"}
    assert marks[".kme-database.1"] != marks[".kme-database.2"]

    kme1, kme2 = network[1], network[2]
    keys = kme1.sae(1).get(f"{kme1.url()}/keys/3/enc_keys", timeout=10).json()["keys"]
    fetched = kme2.sae(3).post(f"{kme2.url()}/keys/1/dec_keys", json={"key_IDs": [{"key_ID": keys[0]["key_ID"]}]},
                               timeout=10)
    assert fetched.json()["keys"] == keys
    kme1.ledger.assert_exact(2)
    kme2.ledger.assert_exact(1)


def test_a_replaced_database_of_one_kme_of_the_shared_folder_is_still_refused(shared):
    network, folder = shared
    write_keys(folder / "link.cor", 10)
    for kme_id in (1, 2):
        assert run_cli(["ingest-keys"], network[kme_id].config).stdout.startswith("ingested 1 files, 10 keys")
    lose_database(network[2].folder)
    again = run_cli(["ingest-keys"], network[2].config)
    assert again.stdout.startswith("ingested 0 files, 0 keys")
    assert f"key folder {folder} was ingested by another database" in again.stdout + again.stderr
    # KME 1's database is still the one its own mark names.
    write_keys(folder / "more.cor", 5)
    assert run_cli(["ingest-keys"], network[1].config).stdout.startswith("ingested 1 files, 5 keys")


def test_an_earlier_release_mark_of_this_database_becomes_its_own_and_frees_the_folder(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / key_folders.LEGACY_MARK).write_text("db-of-kme-1\n")
    assert key_folders.claim(folder, 2, "db-of-kme-2") is not None
    assert key_folders.claim(folder, 1, "db-of-kme-1") is None
    assert not (folder / key_folders.LEGACY_MARK).exists()
    assert key_folders.read_mark(folder, 1) == "db-of-kme-1"
    # The other KME of the link, refused while the single mark was there, now claims the folder for itself.
    assert key_folders.claim(folder, 2, "db-of-kme-2") is None
    assert key_folders.read_mark(folder, 2) == "db-of-kme-2"
    assert key_folders.claim(folder, 2, "a-new-database-of-kme-2") is not None


def test_an_earlier_release_mark_of_another_database_stays_a_refusal(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / key_folders.LEGACY_MARK).write_text("a-lost-database\n")
    refused = key_folders.claim(folder, 1, "db-of-kme-1")
    assert refused is not None and "a-lost-database" in refused
    assert (folder / key_folders.LEGACY_MARK).exists() and not (folder / key_folders.mark_name(1)).exists()


def test_a_kme_id_too_long_for_a_file_name_names_its_mark_by_digest(tmp_path):
    long_id = "k" * 291
    name = key_folders.mark_name(long_id)
    assert len(name) < 255 and key_folders.is_mark(name)
    assert key_folders.claim(tmp_path, long_id, "db") is None
    assert key_folders.read_mark(tmp_path, long_id) == "db"
