"""SimPowerDriver: the in-memory fake switches its state, records calls and fails on request."""

from __future__ import annotations

import pytest

from controller.hardware import PowerError, SimPowerDriver


async def test_the_sim_switches_state_and_records_every_call() -> None:
    """Pins the fake's basic contract: state follows power_off/power_on, calls are recorded in order."""
    sim = SimPowerDriver("h1", state="on", watts=150.0)

    await sim.power_off(soft=True)
    assert await sim.status() == "off"
    assert await sim.power_reading_w() == 0.0
    await sim.power_on()

    assert sim.state == "on"
    assert sim.calls == ["power_off(soft)", "status", "power_reading_w", "power_on"]


async def test_injected_failures_are_power_errors_that_say_how_to_clear_them() -> None:
    """Pins failure injection: fail_power_on raises a PowerError naming the host and the flag to clear."""
    sim = SimPowerDriver("h1", state="off", fail_power_on=True)

    with pytest.raises(PowerError) as caught:
        await sim.power_on()

    assert str(caught.value) == (
        "host 'h1': power on via sim (simulated sim) failed: failure injected by the test; "
        "clear the fail_* flag on the SimPowerDriver"
    )
    assert sim.state == "off"
    assert not (await SimPowerDriver("h1", wake_ok=False).verify_wake_path()).ok
