"""Fixtures for the qemu engine's tests: built guests, drivers on private state dirs, cleanup by PID.

``guests`` builds the test guests once per session (skipping with the reason when QEMU or the
toolchain is missing; under CI that fails instead). ``make_driver(...)`` opens a
:class:`~hv.qemu.driver.QemuDriver` whose image directory is the guests' directory and whose probe
cache is shared by the session, so the KVM probe runs once. When the test ends every driver is
closed and every QEMU started under the test's state directories is killed by its PID.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hv.driver import DriverEvent
from hv.qemu.driver import QemuDriver
from tests.support.qemu import Guests, kill_qemus_under, require_guests

MakeDriver = Callable[..., Awaitable[QemuDriver]]


@pytest.fixture(scope="session")
def guests() -> Guests:
    """The test guests from scripts/build-guests; skips when QEMU or the guests are unavailable."""
    return require_guests()


@pytest.fixture(scope="session")
def qemu_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory (QEMU introspection, KVM verdict) for every driver of the session."""
    return tmp_path_factory.mktemp("qemu-cache")


@pytest.fixture
def events() -> list[DriverEvent]:
    return []


@pytest.fixture
async def make_driver(
    guests: Guests, qemu_cache: Path, tmp_path: Path, events: list[DriverEvent]
) -> AsyncIterator[MakeDriver]:
    """``await make_driver(state="a", **options)``: an open QemuDriver on ``tmp_path/state``."""
    drivers: list[QemuDriver] = []
    state_dirs: set[Path] = set()

    async def make(state: str = "state", **options: Any) -> QemuDriver:
        state_dir = tmp_path / state
        state_dirs.add(state_dir)
        options.setdefault("image_dirs", [guests.dir])
        options.setdefault("cache_dir", qemu_cache)
        driver = QemuDriver(host_id="h1", state_dir=state_dir, **options)
        driver.set_event_sink(events.append)
        await driver.open()
        drivers.append(driver)
        return driver

    try:
        yield make
    finally:
        for driver in drivers:
            with contextlib.suppress(Exception):
                await driver.close()
        for state_dir in state_dirs:
            kill_qemus_under(state_dir)
