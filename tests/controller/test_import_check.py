"""``fleetvisor vm import-check`` as a user runs it: a real process, real files, no controller."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.processes import ROOT

_GOOD = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='KiB'>219136</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>
"""


def _check(*paths: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetvisor", "vm", "import-check", *paths],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_import_check_reports_each_file_and_counts_them(tmp_path: Path) -> None:
    """libvirt-style names import as they are; a refusal lists every problem with its fix; the last
    line counts the files; the exit status says whether all of them import.
    """
    (tmp_path / "sub").mkdir()
    for n, name in enumerate(("QEMUGuest1", "fedora-38", "win10_x64", "rhel9.2")):
        (tmp_path / "sub" / f"{n}-ok.xml").write_text(_GOOD.format(name=name))
    (tmp_path / "bad.xml").write_text(
        _GOOD.format(name="has space").replace("</os>", "</os><devices><hostdev/></devices>")
    )
    (tmp_path / "notes.txt").write_text("not XML, not looked at")

    done = _check(str(tmp_path))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "domxml_files=5 imported=4 refused=1 crashed=0", done.stdout
    assert any(line.startswith("imported") and "vm QEMUGuest1 (2 vCPU" in line for line in lines), done.stdout
    assert any(line.startswith("imported") and "vm rhel9.2 " in line for line in lines), done.stdout
    refused = done.stdout.split("refused  ")[1]
    assert "/domain/name" in refused and "/domain/devices/hostdev" in refused and "host devices" in refused

    one = _check(str(tmp_path / "sub" / "0-ok.xml"))
    assert (
        one.returncode == 0 and one.stdout.splitlines()[-1] == "domxml_files=1 imported=1 refused=0 crashed=0"
    )
    quiet = _check("-q", str(tmp_path / "bad.xml"))
    assert quiet.returncode == 1 and "    - " not in quiet.stdout, quiet.stdout


def test_import_check_names_a_path_that_is_not_there(tmp_path: Path) -> None:
    done = _check(str(tmp_path / "missing"))
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "is not a file or a directory" in done.stderr and "missing" in done.stderr
