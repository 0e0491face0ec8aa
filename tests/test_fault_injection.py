"""Short fault-injection run: load on a KME pair while its processes are killed, then the byte-level accounting.

The long form is bench/soak.py, which prints its figures.
"""
import pytest

from tests import faults


# Kills, restarts and the settling after them take up to two minutes on PostgreSQL while the rest of the suite
# shares the cores: the suite's 120 s per test would cut the check short.
@pytest.mark.timeout(300)
def test_kills_under_load_lose_nothing_and_hand_out_nothing_twice(tmp_path, pki):
    network, files = faults.started_pair(tmp_path, pki, keys_per_file=2000)
    try:
        figures = faults.run(network, files, requests_per_thread=20, threads=6, faults=3)
    finally:
        network.stop_all()
    assert figures.faults == 3 and figures.answered > 0 and figures.fetched == figures.keys
