"""`make run`'s demo, on a copy of the shipped configs, certificates and key files: the README's examples work."""
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tests.support import ROOT, wait_until

# The demo runs on the SQLite files of its own configurations, whatever engine the pass tests.
pytestmark = pytest.mark.engine_independent

README = (ROOT / "README.md").read_text()


def start_demo(tmp_path, configs: str):
    for folder in ("instance", "certs", "keys"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.db*", "*.kek"))
    # Marks left by an earlier `make run`: each demo starts afresh all the same.
    for keys in (tmp_path / "keys").iterdir():
        (keys / ".kme-database").write_text("an-earlier-run\n")
        (keys / ".kme-database.1").write_text("an-earlier-run\n")
        (keys / ".kme-handed-out").mkdir()
        (keys / ".kme-handed-out" / "mark").write_text(f"{'e' * 32} {10**6:020d}\n")
    log = open(tmp_path / "demo.log", "wb")
    process = subprocess.Popen([sys.executable, "deploy/demo.py", str(tmp_path / configs)], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    output = lambda: (tmp_path / "demo.log").read_text(errors="replace")  # noqa: E731
    try:
        wait_until(lambda: "Press Ctrl-C" in output() or process.poll() is not None, timeout=90)
        assert process.poll() is None, output()
        yield tmp_path, output
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode == 0 and "Demo stopped." in output()


@pytest.fixture
def demo(tmp_path):
    yield from start_demo(tmp_path, "instance")


@pytest.fixture
def line3(tmp_path):
    """`make run KMES=3`: the line of instance/line3."""
    yield from start_demo(tmp_path, "instance/line3")


def curl_sessions(line3: bool = False) -> list[list[str]]:
    """The README's curl commands against `make run` (or `make run KMES=3`), one list per shell block,
    continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    sessions = [[line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip().startswith("curl")]
                for block in blocks]
    return [session for session in sessions if session and ("certs/line3" in session[0]) == line3]


def run_session(session: list[str], folder) -> None:
    """Run one shell block's curl calls: each dec_keys (SKIP: key by keyId) fetches the key ID the enc_keys (SKIP:
    new key; ETSI 020: the key a foreign KMS passed) before it got."""
    key_id = value = None
    for command in session:
        answer = run_curl(command.replace("PASTE-KEY-ID-HERE", str(key_id)), folder)
        found = re.search(r'"key_ID":"([0-9a-f-]{36})"', answer) or re.search(r'"keyId":"([0-9a-f]{32})"', answer)
        if "ext_keys" in command:
            assert answer.strip() == "202"
            key_id, value = re.search(r'"key_id": "([0-9a-f-]{36})", "value": "([^"]+)"', command).groups()
        elif "enc_keys" in command or "/key?" in command:
            key_id = found.group(1)
        elif "dec_keys" in command or "/key/" in command:
            assert found.group(1) == key_id
            assert value is None or f'"key":"{value}"' in answer
        elif "/capabilities" in command:
            assert '"localSystemID":"alice-app"' in answer and '"bob-app"' in answer
        elif "/messages" not in command:
            assert '"stored_key_count"' in answer


def run_curl(command: str, cwd) -> str:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_examples_against_the_demo(demo):
    folder, output = demo
    # Each KME's key-encryption key, generated beside its configuration, owner-only, with a warning.
    for name in ("kme1", "kme2"):
        assert (folder / "instance" / f"{name}.kek").stat().st_mode & 0o777 == 0o600
        assert f"generated the key-encryption key file {folder / 'instance' / name}.kek" in output()
    assert "debugging page http://127.0.0.1:18080/" in output()
    assert "interop (ETSI GS QKD 020) interface https://127.0.0.1:13020" in output()
    # The background worker of a new database waits for its schema instead of failing and retrying.
    assert "housekeeping failed" not in output()
    sessions = curl_sessions()
    assert len(sessions) == 4
    for session in sessions:
        run_session(session, folder)
    assert "ETSI GS QKD 004 server 127.0.0.1:25575" in output()
    requests_block, streams_block = re.findall(r"```python\n(.*?)```", README, re.S)
    result = subprocess.run([sys.executable, "-c", requests_block], cwd=folder, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "{'SAE_ID': 1}" in result.stdout
    # Both ends of a key stream read the same three chunks.
    result = subprocess.run([sys.executable, "-c", streams_block], cwd=folder, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["0", "1", "2"]


def test_readme_relay_through_the_three_kme_line(line3):
    folder, output = line3
    assert "relayed through trusted node KME 2" in output()
    (session,) = curl_sessions(line3=True)
    run_session(session, folder)
    events = run_curl("curl -s http://127.0.0.1:18081/messages", folder)
    assert "relayed to KME 3 for SAE 5" in events
