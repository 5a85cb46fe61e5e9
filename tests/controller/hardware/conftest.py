"""Fixtures for the power drivers: a real BMC (OpenIPMI's ipmi_sim) whose power runs a stand-in agent.

``bmc``: a started :class:`~tests.support.ipmi.IpmiSim` on a free loopback port, chassis off; its
power-on command is :data:`~tests.support.ipmi.AGENT_STUB`, which writes its PID to ``bmc_pid_file``.
It is stopped after the test, with everything it started, by PID; a failing test shows its log.
Skipped with a reason when ipmi_sim or ipmitool is missing (failed under CI).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ipmi import IpmiSim, require_ipmi, stub_agent_command


@pytest.fixture
def bmc_pid_file(tmp_path: Path) -> Path:
    """Where the stand-in agent started by the BMC's power-on writes its PID."""
    return tmp_path / "agent" / "agent.pid"


@pytest.fixture
def bmc(tmp_path: Path, bmc_pid_file: Path) -> Iterator[IpmiSim]:
    """A started ipmi_sim (chassis off) whose power-on starts the stand-in agent."""
    require_ipmi()
    bmc_pid_file.parent.mkdir(parents=True, exist_ok=True)
    sim = IpmiSim(tmp_path / "bmc", stub_agent_command(bmc_pid_file))
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()
        print(f"--- {sim!r} log ---\n{sim.log_tail()}")


@pytest.fixture(autouse=True)
def own_bmc_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own BMC thread pool, and waits for it at the end.

    A timed-out pyghmi call keeps running in its thread for a few seconds; left behind, it would touch
    the global ``random`` module while a later test's hypothesis strategy runs, which hypothesis
    reports (rightly) as an error in that unrelated test.
    """
    import concurrent.futures

    from controller.hardware import ipmi

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="test-bmc")
    monkeypatch.setattr(ipmi, "_BMC_THREADS", pool)
    try:
        yield
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
