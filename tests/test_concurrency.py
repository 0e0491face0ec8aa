"""Claims across processes: gunicorn workers and the ingestion worker on one SQLite file."""
import base64
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import Ledger, sae_port, sae_session, start_ingest_worker, start_sae_interface, wait_until, \
    write_config, write_keys

WORKERS = 4
CLIENT_THREADS = 8
REQUESTS = 480
FILES_DURING_RUN = 12


@pytest.fixture
def kme(tmp_path, pki):
    config = write_config(tmp_path, pki)
    write_keys(tmp_path / "keys" / "initial.cor", 600)
    ingest = start_ingest_worker(config, tmp_path / "ingest.log")
    server = start_sae_interface(config, tmp_path / "gunicorn.log", workers=WORKERS, threads=4)
    yield config
    server.stop()
    ingest.stop()


def test_no_key_is_handed_out_twice_while_files_arrive(pki, kme):
    url = f"https://127.0.0.1:{sae_port(kme)}/api/v1/keys/2/enc_keys"
    local = threading.local()
    rng = random.Random(7)
    plan = [(rng.randint(1, 3), rng.choice((256, 512, 128))) for _ in range(REQUESTS)]
    progress = threading.Semaphore(0)

    def call(number_size):
        if not hasattr(local, "session"):
            local.session = sae_session(pki, 1, 1)
        number, size = number_size
        response = local.session.post(url, json={"number": number, "size": size}, timeout=30)
        progress.release()
        return number, size, response.status_code, response.json()

    def feed_files():
        for index in range(FILES_DURING_RUN):
            # Add a file each time another 1/12 of the requests is done, so
            # ingestion and claims interleave.
            for _ in range(REQUESTS // (FILES_DURING_RUN + 1)):
                progress.acquire()
            write_keys(kme.parent / "keys" / f"during-{index:02}.cor", 100)

    feeder = threading.Thread(target=feed_files)
    feeder.start()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        results = list(pool.map(call, plan))
    feeder.join(60)
    assert not feeder.is_alive()

    served = [(n, s, body) for n, s, code, body in results if code == 200]
    refused = [body for _, _, code, body in results if code != 200]
    assert all(code in (200, 503) for _, _, code, _ in results)
    assert all(body["message"].startswith("not enough key material") for body in refused)
    keys = [key for _, _, body in served for key in body["keys"]]
    assert len(served) > REQUESTS // 2
    ids = [key["key_ID"] for key in keys]
    material = [base64.b64decode(key["key"]) for key in keys]
    assert len(set(ids)) == len(ids)
    assert len(set(material)) == len(material)
    # 128-bit keys are prefixes of their pool key: no prefix may repeat either.
    assert len({m[:16] for m in material}) == len(material)

    ledger = Ledger(kme.parent / "kme.db")
    wait_until(lambda: ledger.link(1)["ingested"] == 600 + FILES_DURING_RUN * 100)
    counts = ledger.assert_exact(1)
    assert counts["delivered"] == sum(n * (-(-s // 256)) for n, s, _ in served)
    assert ledger.waiting() == len(keys)
