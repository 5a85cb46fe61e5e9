"""Fixtures for end-to-end tests: ``procs(name, *args)`` starts a ``fleetvisor`` process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.processes import Proc


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``fleetvisor`` subcommands; every one is stopped (SIGTERM, then SIGKILL) by PID afterwards."""
    started: list[Proc] = []

    def start(name: str, *args: str) -> Proc:
        proc = Proc(list(args), tmp_path / f"{name}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
