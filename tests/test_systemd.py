"""The systemd unit files: systemd-analyze accepts them, and they start the project's real entry points."""
import configparser
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.engine_independent

UNITS = sorted((ROOT / "deploy" / "systemd").glob("*@.service"))
ENTRY_POINTS = {
    "kme-sae@.service": ["gunicorn", "-c", "deploy/sae.py", "wsgi:sae_app"],
    "kme-kme@.service": ["gunicorn", "-c", "deploy/kme.py", "wsgi:kme_app"],
    "kme-skip@.service": ["gunicorn", "-c", "deploy/skip.py", "wsgi:skip_app"],
    "kme-interop@.service": ["gunicorn", "-c", "deploy/interop.py", "wsgi:interop_app"],
    "kme-debug@.service": ["gunicorn", "-c", "deploy/debug.py", "wsgi:debug_app"],
    "kme-ingest@.service": ["flask", "--app", "wsgi", "ingest-keys", "--watch"],
    "kme-etsi004@.service": ["flask", "--app", "wsgi", "serve-etsi004"],
}


def parse(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser


def test_every_interface_has_a_unit():
    assert {unit.name for unit in UNITS} == set(ENTRY_POINTS)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_runs_an_entry_point_unprivileged_and_hardened(unit):
    service = parse(unit)["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0] == f"/opt/kme/.venv/bin/{ENTRY_POINTS[unit.name][0]}"
    assert command[1:] == ENTRY_POINTS[unit.name][1:]
    for word in command:
        if word.startswith("deploy/"):
            assert (ROOT / word).is_file()
    assert service["Environment"] == "KME_CONFIG=/etc/kme/%i.json5 KME_RUNTIME_DIR=/run/kme"
    assert service["RuntimeDirectory"] == "kme" and service["RuntimeDirectoryPreserve"] == "yes"
    assert service["User"] == "kme" and service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    # Every process opens the key store: each gets the key-encryption key as a credential.
    assert service["LoadCredential"] == "kek:/etc/kme/%i.kek"


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    """Verified as installed: /opt/kme replaced by this checkout and its virtual environment."""
    venv_bin = Path(sys.executable).parent
    names = []
    for unit in [*UNITS, ROOT / "deploy" / "systemd" / "kme@.target"]:
        text = unit.read_text().replace("/opt/kme/.venv/bin/", f"{venv_bin}/").replace("/opt/kme", str(ROOT))
        name = unit.name.replace("@.", "@test.")
        (tmp_path / name).write_text(text)
        names.append(f"./{name}")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
