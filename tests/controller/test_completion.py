"""Shell completion: the scripts ``fleetvisor completion bash|zsh`` prints, run in a real bash and zsh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.processes import ROOT

#: Completing "fleetvisor host roll" and "fleetvisor host rolling-maintenance --ret".
_PROBE = """
COMP_WORDS=(fleetvisor host roll); COMP_CWORD=2; _fleetvisor; echo "1:${COMPREPLY[@]}"
COMP_WORDS=(fleetvisor host rolling-maintenance --ret); COMP_CWORD=3; _fleetvisor; echo "2:${COMPREPLY[@]}"
COMP_WORDS=(fleetvisor vm create web --co); COMP_CWORD=4; _fleetvisor; echo "3:${COMPREPLY[@]}"
"""


def _script(shell: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fleetvisor", "completion", shell],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_the_completion_script_completes_commands_and_their_flags(shell: str, tmp_path) -> None:
    binary = shutil.which(shell)
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{shell} is missing under CI; ./scripts/test installs it (Debian package {shell})")
        pytest.skip(f"{shell} is not installed (apt-get install -y {shell})")
    script = tmp_path / f"fleetvisor.{shell}"
    script.write_text(_script(shell))
    # zsh runs bash completion functions with ksharrays (0-based arrays), as bashcompinit does.
    setup = "setopt ksharrays\n" if shell == "zsh" else ""
    done = subprocess.run(
        [binary, "-c", f"source {script}\n{setup}{_PROBE}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
    assert lines["1"].split() == ["rolling-maintenance"], done.stdout
    assert lines["2"].split() == ["--return-vms"], done.stdout
    assert lines["3"].split() == ["--count"], done.stdout


def test_an_unknown_shell_is_refused_with_the_choices() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fleetvisor", "completion", "fish"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "choose from 'bash', 'zsh'" in done.stderr, done.stderr
