"""FallbackPower: a failed power-on falls back to the next method, or raises one error naming them all."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from controller.hardware import (
    FallbackExhausted,
    FallbackPower,
    IpmiDriver,
    PowerError,
    SimPowerDriver,
    WakeOnLanDriver,
    WolConfig,
)
from tests.controller.hardware.support import bmc_config
from tests.support.ipmi import IpmiSim, pid_alive, wait_until


def _pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


async def test_a_failing_first_method_falls_back_to_ipmi(
    bmc: IpmiSim, bmc_pid_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pins the fallback: the failing sim method is logged, then IPMI powers the real BMC on."""
    failing = SimPowerDriver("h1", state="off", fail_power_on=True)
    chain = FallbackPower([failing, IpmiDriver(bmc_config(bmc))])

    with caplog.at_level(logging.WARNING, logger="controller.hardware.chain"):
        await chain.power_on()

    assert failing.calls == ["power_on"]
    assert chain.last_used == "ipmi"
    await asyncio.to_thread(wait_until, lambda: _pid(bmc_pid_file), 5, "the agent to start")
    assert await asyncio.to_thread(bmc.power_via_ipmitool) == "on"
    assert "power on via sim failed" in caplog.text
    assert "power on succeeded via ipmi after 1 failed method(s)" in caplog.text


async def test_when_every_method_fails_the_error_names_each_one(bmc: IpmiSim) -> None:
    """Pins the alert: one PowerError listing every method with its target, reason and fix."""
    chain = FallbackPower(
        [SimPowerDriver("h1", state="off", fail_power_on=True), IpmiDriver(bmc_config(bmc, password="wrong"))]
    )

    with pytest.raises(FallbackExhausted) as caught:
        await chain.power_on()

    message = str(caught.value)
    assert message.startswith("host 'h1': power on via sim+ipmi (every method) failed: ")
    assert "[sim: simulated sim] failure injected by the test" in message
    assert f"[ipmi: BMC 127.0.0.1:{bmc.port}] the BMC refused the login of user 'admin'" in message
    assert "fix any one of them: [sim] clear the fail_* flag" in message
    assert "[ipmi] check the username and password" in message
    assert [f.method for f in caught.value.failures] == ["sim", "ipmi"]
    assert isinstance(caught.value, PowerError)


async def test_power_off_skips_methods_that_cannot_and_uses_the_next() -> None:
    """Pins that power_off passes over Wake-on-LAN (which cannot) to the first method that can."""
    wol = WakeOnLanDriver("h1", WolConfig(mac="52:54:00:12:34:56", broadcast="127.0.0.1"))
    sim = SimPowerDriver("h1", state="on")
    chain = FallbackPower([wol, sim])

    await chain.power_off()

    assert sim.state == "off"
    assert chain.last_used == "sim"


async def test_power_off_with_no_capable_method_says_so() -> None:
    """Pins the error when no method of the host can power off at all."""
    chain = FallbackPower([WakeOnLanDriver("h1", WolConfig(mac="52:54:00:12:34:56"))])

    with pytest.raises(PowerError, match=r"none of this host's methods \(wol\) can power off; add one"):
        await chain.power_off()


async def test_status_comes_from_the_first_method_that_knows() -> None:
    """Pins that 'unknown' (WoL) and a failing method are passed over for one that can tell."""
    wol = WakeOnLanDriver("h1", WolConfig(mac="52:54:00:12:34:56"))
    broken = SimPowerDriver("h1", method="broken", fail_status=True)
    chain = FallbackPower([wol, broken, SimPowerDriver("h1", state="off")])

    assert await chain.status() == "off"
    assert await FallbackPower([wol]).status() == "unknown"


async def test_wake_path_is_ok_when_any_wake_method_verifies() -> None:
    """Pins that one working wake method is enough, and the detail reports every method."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        wol = WakeOnLanDriver(
            "h1", WolConfig(mac="52:54:00:12:34:56", broadcast="127.0.0.1", port=receiver.getsockname()[1])
        )
        broken = SimPowerDriver("h1", wake_ok=False)

        check = await FallbackPower([broken, wol]).verify_wake_path()
        none_work = await FallbackPower([broken]).verify_wake_path()

    assert check.ok
    assert check.method == "wol"
    assert check.detail.startswith(
        "[sim: FAILED] simulated sim: wake path is set to fail; [wol: ok] WoL 52:54"
    )
    assert not none_work.ok


async def test_a_slow_method_times_out_and_the_next_one_is_used() -> None:
    """Pins that a method that hangs costs only its timeout before the fallback acts."""
    slow = SimPowerDriver("h1", method="slow", state="off", delay_s=10, timeout_s=0.05)
    quick = SimPowerDriver("h1", state="off")

    await FallbackPower([slow, quick]).power_on()

    assert quick.state == "on"


async def test_power_reading_comes_from_the_first_method_that_measures() -> None:
    """Pins that a method without a reading is passed over for one with a measurement."""
    chain = FallbackPower([SimPowerDriver("h1"), SimPowerDriver("h1", method="meter", watts=212.5)])
    assert await chain.power_reading_w() == 212.5


def test_a_chain_is_for_one_host() -> None:
    """Pins that an empty chain, or one mixing hosts, is refused at construction."""
    with pytest.raises(ValueError, match="at least one"):
        FallbackPower([])
    with pytest.raises(ValueError, match="must all switch one host, got h1, h2"):
        FallbackPower([SimPowerDriver("h1"), SimPowerDriver("h2")])
