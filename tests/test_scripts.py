"""The shell helpers behind ./scripts/test, ./scripts/demo and ./scripts/bench, and the CI rules they
share with the tests: the package list, where the guests live, and that CI never skips silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import needs
from tests.support.qemu import DEFAULT_GUEST_DIR, guest_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env_sh(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash after sourcing scripts/_env.sh (nothing is installed by sourcing it)."""
    return subprocess.run(
        ["bash", "-c", f"source scripts/_env.sh && {script}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )


def test_setting_up_the_venv_keeps_stderr() -> None:
    """After fv_ensure_venv, what a script or bench writes to stderr still reaches the caller
    (a bare `exec 9>&- 2>/dev/null` once sent every later error to /dev/null).
    """
    done = _env_sh("fv_ensure_venv && echo 'still heard' >&2")
    assert done.returncode == 0, done.stderr
    assert "still heard" in done.stderr


def test_the_test_packages_include_busybox_static_and_iproute2() -> None:
    """FV_PACKAGES_TEST keeps busybox-static (probed as a static busybox) and iproute2 (probed as ip)."""
    done = _env_sh('printf "%s\\n" "${FV_PACKAGES_TEST[@]}"')
    assert done.returncode == 0, done.stderr
    probes = dict(line.split(":", 1) for line in done.stdout.splitlines())
    assert probes.get("busybox-static") == "static:busybox", (
        "the Linux guest's initramfs needs a static busybox; any busybox on PATH is not enough"
    )
    assert probes.get("iproute2") == "ip", "the network-namespace migration test runs ip"


def test_a_dynamic_busybox_does_not_pass_for_busybox_static(tmp_path: Path) -> None:
    """fv_have_package's static: probe refuses a dynamically linked busybox first on PATH."""
    dynamic = shutil.which("true")
    assert dynamic is not None
    (tmp_path / "busybox").symlink_to(dynamic)  # /usr/bin/true: linked against libc
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    # A package name dpkg does not know, so only the probe decides.
    done = _env_sh("fv_have_package fleetvisor-no-such-package static:busybox", env)
    assert done.returncode == 1, done.stderr


def test_a_static_busybox_passes_the_probe() -> None:
    """The static busybox of busybox-static passes fv_have_package's static: probe on its own."""
    found = shutil.which("busybox")
    static = (
        found is not None and subprocess.run(["ldd", found], capture_output=True, check=False).returncode != 0
    )
    needs.need(static, "busybox-static is not installed (apt-get install -y busybox-static)")
    done = _env_sh("fv_have_package fleetvisor-no-such-package static:busybox")
    assert done.returncode == 0, done.stderr


def test_the_guests_are_found_through_fv_guest_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """FV_GUEST_DIR moves the guests for the scripts and the tests alike; unset, both use .cache/guests."""
    env = {k: v for k, v in os.environ.items() if k != "FV_GUEST_DIR"}
    done = _env_sh('printf "%s" "$FV_GUEST_DIR"', env)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout) == DEFAULT_GUEST_DIR == REPO_ROOT / ".cache" / "guests"
    done = _env_sh('printf "%s" "$FV_GUEST_DIR"', {**env, "FV_GUEST_DIR": str(tmp_path)})
    assert Path(done.stdout) == tmp_path
    monkeypatch.delenv("FV_GUEST_DIR", raising=False)
    assert guest_dir() == DEFAULT_GUEST_DIR
    monkeypatch.setenv("FV_GUEST_DIR", str(tmp_path))
    assert guest_dir() == tmp_path
    script = (REPO_ROOT / "scripts" / "build-guests").read_text()
    assert 'OUT="${1:-${FV_GUEST_DIR:-$ROOT/.cache/guests}}"' in script, "build-guests writes to FV_GUEST_DIR"


def test_a_missing_requirement_skips_here_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """need(): a skip with the reason on a developer's machine, a failure naming it under CI=true."""
    monkeypatch.delenv("CI", raising=False)
    needs.need(True, "never shown")
    with pytest.raises(pytest.skip.Exception, match="mosquitto is not installed"):
        needs.need(False, "mosquitto is not installed")
    with pytest.raises(pytest.skip.Exception, match="no_such_module"):
        needs.need_module("no_such_module", "a package is missing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"mosquitto is not installed .*CI=true"):
        needs.need(False, "mosquitto is not installed")
    with pytest.raises(pytest.fail.Exception, match="no_such_module"):
        needs.need_module("no_such_module", "a package is missing")
    monkeypatch.setenv("CI", "1")  # only CI=true is CI here, as in scripts/test
    with pytest.raises(pytest.skip.Exception):
        needs.need(False, "mosquitto is not installed")
