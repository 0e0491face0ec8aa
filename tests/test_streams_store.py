"""The key store's side of ETSI GS QKD 004 streams across a link, in process on a temporary database of the
pass's engine (the two KMEs and their processes are in test_etsi004_link.py, run once with SQLite): an index
claimed once, a claim dropped or marked made, a close the other KME must hear of, a chunk recorded at the slave's
KME, the slave's end opened with what the master's KME said, the link's measured rate, expiry by TTL."""
import pytest

from kme import clock, create_app
from kme.config import load_config
from kme.storage.keystore import streams
from kme.storage.schema import ensure_schema
from tests.support import Ledger, write_config, write_keys

KSID = "0b7d6c1e-2f4a-4e5b-8c6d-7e8f9a0b1c2d"


@pytest.fixture
def ledger(tmp_path, pki):
    path = write_config(tmp_path, pki)
    write_keys(tmp_path / "keys" / "zone.cor", 16)
    app = create_app(load_config(path))
    with app.app_context():
        ensure_schema()
        from kme.operations.ingest import ingest_directories

        ingest_directories(app.extensions["kme"])
        yield Ledger(tmp_path / "kme.db")


def master_stream() -> streams.Stream:
    """A stream of master SAE 1 of this KME with SAE 3 of KME 2, opened by its master."""
    stream, became = streams.open_end(KSID, 2, 1, 3, 32, 60, True)
    assert became == streams.OPEN
    return stream


def test_an_index_is_claimed_once_then_made_or_freed(ledger):
    stream = master_stream()
    assert streams.claim_chunk(stream, 0) == streams.CLAIMED
    assert streams.claim_chunk(stream, 0) == streams.MAKING
    assert streams.chunk_state(KSID, 0) == streams.MAKING
    streams.mark_made(KSID, 0)
    assert streams.claim_chunk(stream, 0) == streams.MADE
    # A claim whose activation provably did not happen frees its index; a made chunk is never freed.
    assert streams.claim_chunk(stream, 1) == streams.CLAIMED
    streams.drop_claim(KSID, 1)
    streams.drop_claim(KSID, 0)
    assert streams.chunk_state(KSID, 1) is None and streams.chunk_state(KSID, 0) == streams.MADE
    assert streams.claim_chunk(stream, 1) == streams.CLAIMED


def test_a_close_the_other_kme_must_hear_of_is_remembered_until_it_did(ledger):
    stream = master_stream()
    other = streams.open_end("5e4d3c2b-1a09-4f8e-9d7c-6b5a4f3e2d1c", 2, 1, 3, 32, 60, True)[0]
    streams.close(stream, "SAE 1", tell_peer=True)
    streams.close(other, "KME 2 (an end closed it there)")
    assert [found.ksid for found in streams.closes_untold()] == [KSID] and streams.find(KSID).closed
    streams.close_told(KSID)
    assert streams.closes_untold() == []


def test_a_chunk_recorded_at_the_slaves_kme_opens_the_masters_end_there(ledger):
    # The slave's KME (this one, for the test) learns of the stream by its first chunk.
    streams.record_chunk(KSID, 4, 2, 3, 1, 16, 60)
    streams.record_chunk(KSID, 4, 2, 3, 1, 16, 60)
    stream = streams.find(KSID)
    assert (stream.master_end, stream.slave_end, stream.chunk_size) == (streams.OPEN, streams.ABSENT, 16)
    assert streams.chunk_state(KSID, 4) == streams.MADE
    # The slave opens its end later: open already, with the stream's chunk size.
    stream, became = streams.open_end(KSID, 2, 3, 1, 64, 60, False)
    assert became == streams.OPEN and stream.chunk_size == 16


def test_the_slaves_end_opens_as_the_masters_kme_says(ledger):
    _, became = streams.open_end(KSID, 2, 3, 1, 32, 60, False, master_open=False)
    assert became == streams.WAITING
    stream, became = streams.open_end(KSID, 2, 3, 1, 32, 60, False, master_open=True)
    assert became == streams.OPEN and stream.master_end == streams.OPEN
    assert streams.open_end(KSID, 2, 3, 1, 32, 60, False, master_open=True)[1] is None


def test_the_links_rate_counts_the_key_files_of_the_last_hour(ledger):
    # 16 keys of 32 bytes ingested moments ago: 4 096 bits over at least a second.
    assert 0 < streams.link_rate_bps(1) <= 16 * 32 * 8
    assert streams.link_rate_bps(2) == 0


def test_expiry_erases_each_chunk_once_its_ttl_passed_and_the_chunks_made_later_too(ledger, monkeypatch):
    stream, _ = streams.open_end(KSID, 1, 1, 2, 32, 60, True)
    streams.open_end(KSID, 1, 1, 2, 32, 60, False)
    real = clock.utc_now

    def later(seconds: float):
        """The clock, for the store, ``seconds`` ahead."""
        monkeypatch.setattr(clock, "utc_now", lambda ago=0: real(ago - seconds))

    assert streams.read_chunk(stream, 0, 1, make=True) is not None
    later(61)
    assert streams.expire() == 1
    # Expired up to that round: the next one looks at the chunks made since only, and finds none.
    assert ledger._query("SELECT expired_before FROM key_streams") != [(None,)]
    assert streams.expire() == 0
    assert streams.read_chunk(stream, 1, 1, make=True) is not None
    assert streams.expire() == 0
    later(122)
    assert streams.expire() == 1
    assert ledger.waiting() == 0
