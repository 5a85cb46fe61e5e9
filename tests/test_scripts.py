"""The shell helpers behind ./scripts/test, ./scripts/demo and ./scripts/bench."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_setting_up_the_venv_keeps_stderr() -> None:
    """After fv_ensure_venv, what a script or bench writes to stderr still reaches the caller
    (a bare `exec 9>&- 2>/dev/null` once sent every later error to /dev/null).
    """
    done = subprocess.run(
        ["bash", "-c", "source scripts/_env.sh && fv_ensure_venv && echo 'still heard' >&2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "still heard" in done.stderr
