"""ETSI GS QKD 004 key streams across a link: the master SAE 1 at KME 1, the slave SAE 3 at KME 2, each end on its
own KME's real `flask serve-etsi004` process over TLS, the chunks made by KME 1 from its direction of the link and
activated at KME 2 through the real inter-KME interface: equal chunks by index at both ends, either end reading
first, the slave opening first, a KSID in use, CLOSE reaching the other KME (also once it answers again),
restarts of every process of both KMEs mid-stream, and what the inter-KME routes refuse. Accounting exact at both ends."""
import uuid

import pytest

from tests.network import Network
from tests.support import wait_until
from tests.test_etsi004 import Client

# The stream store's statements run on both engines in test_streams_store.py; the processes, once.
pytestmark = pytest.mark.one_engine

LINK_KEYS = 600


@pytest.fixture(scope="module")
def network(tmp_path_factory, pki):
    network = Network(tmp_path_factory.mktemp("etsi004-link"), pki, [(1, 2)], workers=1, etsi004=True)
    network.start_with_links([(1, 2)], LINK_KEYS)
    yield network
    network.stop_all()
    for kme, peer in ((1, 2), (2, 1)):
        network[kme].ledger.assert_exact(peer)


def ends(network) -> tuple[Client, Client]:
    """The master SAE 1 at KME 1 and the slave SAE 3 at KME 2."""
    return (Client(network[1].port("etsi004_interface"), network.pki, 1, kme=1),
            Client(network[2].port("etsi004_interface"), network.pki, 3, kme=2))


def open_both(network, chunk: int = 32) -> tuple[Client, Client, uuid.UUID]:
    master, slave = ends(network)
    status, granted, ksid = master.open_connect("qkd://1@1", "qkd://3@2", chunk)
    assert status == 0 and granted[0] == chunk
    assert slave.open_connect("qkd://1@1", "qkd://3@2", chunk, ksid=ksid)[0] == 0
    return master, slave, ksid


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_both_ends_on_two_kmes_read_the_same_chunks_by_index_once_each(network, chunk):
    master, slave, ksid = open_both(network, chunk)
    # The master reads the even indexes first, the slave the odd ones: either end's first read makes a chunk.
    first = {index: (master if index % 2 == 0 else slave).get_key(ksid, index) for index in range(6)}
    second = {index: (slave if index % 2 == 0 else master).get_key(ksid, index) for index in range(6)}
    assert first == second
    assert all(status == 0 and len(data) == chunk for status, data in first.values())
    assert len({data for _status, data in first.values()}) == 6
    assert master.get_key(ksid, 1) == (2, b"") and slave.get_key(ksid, 0) == (2, b"")
    # Each end's copy is erased once read: nothing of the stream waits at either KME.
    for kme in (1, 2):
        assert network[kme].ledger._query("SELECT COUNT(*) FROM delivered_keys") == [(0,)]


def test_the_slave_opening_first_on_its_kme_waits_for_the_master_on_the_other(network):
    master, slave = ends(network)
    ksid = uuid.uuid4()
    assert slave.open_connect(1, 3, 64, ksid=ksid)[0] == 1
    assert slave.get_key(ksid, 0) == (3, b"")
    # The slave's end set the chunk size: the master asking for another one is granted the stream's (status 7).
    status, granted, _ = master.open_connect(1, 3, 32, ksid=ksid)
    assert status == 7 and granted[0] == 64
    assert slave.open_connect(1, 3, 64, ksid=ksid)[0] == 0
    at_slave = slave.get_key(ksid, 0)
    assert at_slave[0] == 0 and master.get_key(ksid, 0) == at_slave


def test_a_ksid_in_use_is_refused_at_either_kme(network):
    master, slave, ksid = open_both(network)
    assert slave.open_connect(1, 3, ksid=ksid)[0] == 5
    assert master.open_connect(1, 3, ksid=ksid)[0] == 5


@pytest.mark.parametrize("closer", ["master", "slave"])
def test_close_at_one_kme_ends_the_stream_at_both_and_erases_what_was_not_read(network, closer):
    master, slave, ksid = open_both(network)
    assert master.get_key(ksid, 0)[0] == 0 and slave.get_key(ksid, 1)[0] == 0
    # Chunk 0 waits for the slave at KME 2, chunk 1 for the master at KME 1.
    assert [network[kme].ledger.waiting() for kme in (1, 2)] == [1, 1]
    assert (master if closer == "master" else slave).close(ksid) == 0
    assert [network[kme].ledger.waiting() for kme in (1, 2)] == [0, 0]
    assert master.get_key(ksid, 1) == (3, b"") and slave.get_key(ksid, 0) == (3, b"")
    assert slave.get_key(ksid, 2) == (3, b"")


def test_a_close_the_other_kme_could_not_hear_reaches_it_once_it_answers(network):
    master, slave, ksid = open_both(network)
    assert master.get_key(ksid, 0)[0] == 0
    network[2].stop("kme")
    try:
        assert master.close(ksid) == 0
        # KME 2 still holds its copy of chunk 0 for the slave, and KME 1 remembers that KME 2 was not told.
        assert network[2].ledger.waiting() == 1
        assert network[1].ledger._query("SELECT COUNT(*) FROM key_streams WHERE close_untold") == [(1,)]
    finally:
        network[2].start("kme")
    wait_until(lambda: network[2].ledger.waiting() == 0, 20)
    assert slave.get_key(ksid, 0) == (3, b"")
    wait_until(lambda: network[1].ledger._query("SELECT COUNT(*) FROM key_streams WHERE close_untold") == [(0,)],
               20)


def test_a_chunk_older_than_the_ttl_is_erased_at_the_slaves_kme_too(network):
    master, slave = ends(network)
    _, _, ksid = master.open_connect(1, 3, ttl=1)
    assert slave.open_connect(1, 3, ttl=1, ksid=ksid)[0] == 0
    assert master.get_key(ksid, 0)[0] == 0
    log = network[2].folder / "ingest.log"
    wait_until(lambda: f"Key stream {ksid}: 1 chunks expired" in log.read_text(), 20)
    assert slave.get_key(ksid, 0) == (2, b"")


def test_every_process_of_both_kmes_restarted_mid_stream_keeps_the_stream(network):
    master, slave, ksid = open_both(network)
    before = [master.get_key(ksid, index)[1] for index in range(3)]
    for kme in (1, 2):
        for name in ("etsi004", "kme", "ingest"):
            network[kme].processes.pop(name).kill()
            network[kme].start(name)
    assert [slave.get_key(ksid, index)[1] for index in range(3)] == before
    assert slave.get_key(ksid, 3) == master.get_key(ksid, 3)
    assert slave.get_key(ksid, 3) == (2, b"")


def test_the_inter_kme_stream_routes_check_who_calls_and_what_for(network):
    client = network.peer_client(2, 1)
    master, _slave, ksid = open_both(network)
    # KME 2 may not open a stream for an SAE that is not its own, nor for a master that is not KME 1's.
    for master_id, slave_id in ((1, 2), (3, 4)):
        with pytest.raises(Exception, match="HTTP 403"):
            client.stream_open({"KSID": str(uuid.uuid4()), "master_SAE_ID": master_id, "slave_SAE_ID": slave_id,
                                "chunk_size": 32, "ttl": 60}, None)
    # A stream of KME 1's zone is not on the link with KME 2.
    zone_ksid = Client(network[1].port("etsi004_interface"), network.pki, 1, kme=1).open_connect(1, 2)[2]
    with pytest.raises(Exception, match="HTTP 403"):
        client.stream_chunk({"KSID": str(zone_ksid), "index": 0}, None)
    with pytest.raises(Exception, match="HTTP 403"):
        client.stream_close({"KSID": str(zone_ksid)}, None)
    # An unknown stream: its master never opened it.
    assert client.stream_chunk({"KSID": str(uuid.uuid4()), "index": 0}, None)["status"] == 3
    # Another KME's certificate gets nothing.
    with pytest.raises(Exception, match="HTTP 401"):
        network.peer_client(2, 1, pfx_of=3).stream_chunk({"KSID": str(ksid), "index": 0}, None)
    assert master.get_key(ksid, 0)[0] == 0
