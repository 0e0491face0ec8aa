"""The launcher the tests start KME processes from (tests/launcher.py): a process it forks runs its module as
`python -m` would, with its own arguments, environment and output files, and is stopped by its pid and reaped
with the status a subprocess.Popen would report."""
import os
import signal
import subprocess
import sys

import pytest

from tests.launcher import launcher
from tests.support import ROOT, run_cli, wait_until

pytestmark = pytest.mark.engine_independent


def test_a_launched_module_gets_its_arguments_environment_and_output(tmp_path):
    missing = tmp_path / "missing.json"
    refused = run_cli(["kme-status"], missing)
    assert refused.returncode == 1
    assert f"kme: {missing}: cannot read" in refused.stderr
    assert "Flask" in run_cli(["--version"], None).stdout


def test_a_module_that_cannot_run_ends_with_status_1_and_says_why(tmp_path):
    out = tmp_path / "out"
    process = launcher().start([sys.executable, "-m", "tests.no_such_module"], dict(os.environ), ROOT, out, None)
    assert process.wait(30) == 1
    assert "No module named tests.no_such_module" in out.read_text()


def test_a_launched_process_is_stopped_by_its_pid_and_its_end_reported(tmp_path):
    process = launcher().start([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"],
                               dict(os.environ), tmp_path, tmp_path / "out", None)
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(0.5)
    assert process.poll() is None
    process.kill()
    assert process.wait(30) == -signal.SIGKILL
    process.terminate()
    assert process.poll() == -signal.SIGKILL


def test_only_python_modules_are_launched(tmp_path):
    with pytest.raises(ValueError, match="only"):
        launcher().start(["bash", "-c", "true"], dict(os.environ), tmp_path, tmp_path / "out", None)


# A test process that dies without closing its launcher (a crash): it started a server first, and says its pid.
_CRASHING = """
import os, sys
from tests.launcher import launcher
server = launcher().start([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], dict(os.environ),
                          sys.argv[1], sys.argv[1] + "/out", None)
print(server.pid, flush=True)
os._exit(3)
"""


def test_what_a_crashed_test_process_started_does_not_outlive_it(tmp_path):
    crashed = subprocess.run([sys.executable, "-c", _CRASHING, str(tmp_path)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert crashed.returncode == 3, crashed.stderr
    server = int(crashed.stdout)
    wait_until(lambda: not os.path.exists(f"/proc/{server}"), timeout=20)
