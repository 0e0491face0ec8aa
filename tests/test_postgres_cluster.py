"""The tests' throwaway PostgreSQL cluster (tests/postgres.py) outlives no session: a process that made one and was
killed without stopping it leaves no server running and no folder behind."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.support import free_port, wait_until

# The helper, not an engine: run once, in the SQLite pass.
pytestmark = pytest.mark.engine_independent

ROOT = Path(__file__).resolve().parent.parent
_MAKER = """
import sys, time
from tests.postgres import Cluster
cluster = Cluster(int(sys.argv[1]), durable=False)
cluster.start()
print(cluster.folder, flush=True)
time.sleep(120)
"""


def test_a_cluster_whose_session_was_killed_is_stopped_and_removed(tmp_path):
    port = free_port()
    maker = subprocess.Popen([sys.executable, "-c", _MAKER, str(port)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        folder = Path(maker.stdout.readline().strip())
        assert (folder / "data" / "postmaster.pid").exists()
        server = int((folder / "data" / "postmaster.pid").read_text().split()[0])
        with psycopg.connect(f"host=127.0.0.1 port={port} dbname=postgres user=kme password=kme-test-password"):
            pass
    finally:
        os.kill(maker.pid, signal.SIGKILL)
        maker.wait(10)
        maker.stdout.close()
    # The guardian notices within a second or two, stops the server and removes the folder.
    wait_until(lambda: not folder.exists() and not Path(f"/proc/{server}").exists(), 30)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"host=127.0.0.1 port={port} dbname=postgres user=kme password=kme-test-password",
                        connect_timeout=2)
