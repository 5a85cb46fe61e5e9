"""IpmiDriver against a real BMC peer (OpenIPMI's ipmi_sim), with ipmitool as the independent client.

The simulated chassis's power is a process (a stand-in agent), so "powered off" is checked by its PID
being gone, and "powered on" by a new PID running.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.hardware import IpmiDriver, PowerError
from controller.hardware.ipmi import BmcConfig, parse_dcmi_power_reading
from tests.controller.hardware.support import bmc_config, dead_bmc_config
from tests.support.ipmi import IpmiSim, pid_alive, wait_until


def _agent_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


async def _power_on_with_ipmitool(bmc: IpmiSim, pid_file: Path) -> int:
    await asyncio.to_thread(bmc.ipmitool, "chassis", "power", "on")
    await asyncio.to_thread(wait_until, lambda: _agent_pid(pid_file), 5, "the stand-in agent to start")
    pid = _agent_pid(pid_file)
    assert pid is not None
    return pid


async def test_power_off_stops_the_agent_and_power_on_starts_it_again(
    bmc: IpmiSim, bmc_pid_file: Path
) -> None:
    """Pins the BMC loop: power_off ends the agent's PID and ipmitool reads off; power_on runs a new one, on."""
    first = await _power_on_with_ipmitool(bmc, bmc_pid_file)
    driver = IpmiDriver(bmc_config(bmc))

    await driver.power_off()

    await asyncio.to_thread(wait_until, lambda: not pid_alive(first), 5, f"agent pid {first} to exit")
    assert bmc.started_pids() == []
    assert await asyncio.to_thread(bmc.power_via_ipmitool) == "off"
    assert await driver.status() == "off"

    await driver.power_on()

    await asyncio.to_thread(
        wait_until, lambda: _agent_pid(bmc_pid_file) not in (None, first), 5, "a new agent process"
    )
    assert bmc.started_pids() == [_agent_pid(bmc_pid_file)]
    assert await asyncio.to_thread(bmc.power_via_ipmitool) == "on"
    assert await driver.status() == "on"


async def test_status_follows_changes_made_by_ipmitool(bmc: IpmiSim) -> None:
    """Pins that status() reads the chassis as ipmitool last set it, in both states."""
    driver = IpmiDriver(bmc_config(bmc))
    for command in ("on", "off", "on"):
        await asyncio.to_thread(bmc.ipmitool, "chassis", "power", command)

        def reads(expected: str = command) -> bool:
            return bmc.power_via_ipmitool() == expected

        # A power-off completes when the BMC has reaped the host's process, a moment later.
        await asyncio.to_thread(wait_until, reads, 5, f"ipmitool to read {command}")
        assert await driver.status() == command


async def test_power_on_when_already_on_keeps_the_same_agent(bmc: IpmiSim, bmc_pid_file: Path) -> None:
    """Pins that power_on of a host that is on is a no-op: the running agent is not restarted."""
    pid = await _power_on_with_ipmitool(bmc, bmc_pid_file)

    await IpmiDriver(bmc_config(bmc)).power_on()

    assert _agent_pid(bmc_pid_file) == pid
    assert bmc.started_pids() == [pid]


async def test_wrong_password_is_a_power_error_that_says_what_to_fix(bmc: IpmiSim) -> None:
    """Pins the message for a refused login: host, BMC address, the refusal and the settings to check."""
    driver = IpmiDriver(bmc_config(bmc, password="wrong"))

    with pytest.raises(PowerError) as caught:
        await driver.power_on()

    message = str(caught.value)
    assert message.startswith(f"host 'h1': power on via ipmi (BMC 127.0.0.1:{bmc.port}) failed:")
    assert "refused the login of user 'admin'" in message
    assert "check the username and password" in message
    assert "wrong" not in message, "the password must not leak into messages"
    assert await asyncio.to_thread(bmc.power_via_ipmitool) == "off"


async def test_unreachable_bmc_fails_within_the_timeout() -> None:
    """Pins that a BMC that never answers gives a PowerError after timeout_s, not pyghmi's own delay."""
    config = dead_bmc_config(timeout_s=1.0)
    driver = IpmiDriver(config)

    with pytest.raises(PowerError) as caught:
        await driver.status()

    # "no answer within 1s" is only said when the driver's own deadline expired (pyghmi's socket
    # timeouts read "network timeout"), which shows which timeout ended the call without a stopwatch.
    assert f"(BMC 127.0.0.1:{config.port})" in str(caught.value)
    assert "no answer within 1s" in str(caught.value)
    assert f"reachable from this controller on UDP port {config.port}" in str(caught.value)


async def test_verify_wake_path_is_ok_for_a_live_bmc(bmc: IpmiSim) -> None:
    """Pins that a BMC that logs us in with power-control privilege passes the wake-path check."""
    check = await IpmiDriver(bmc_config(bmc)).verify_wake_path()

    assert check.ok, check.detail
    assert check.method == "ipmi"
    assert "authenticated as 'admin' (ADMINISTRATOR); chassis power is off" in check.detail


async def test_verify_wake_path_fails_for_a_dead_bmc() -> None:
    """Pins that a BMC that does not answer fails the wake-path check (it does not raise)."""
    check = await IpmiDriver(dead_bmc_config(timeout_s=1.0)).verify_wake_path()

    assert not check.ok
    assert "no answer within 1s" in check.detail


async def test_soft_power_off_refused_by_the_bmc_says_to_power_off_hard(
    bmc: IpmiSim, bmc_pid_file: Path
) -> None:
    """Pins that a BMC that cannot ask the OS to shut down gives a PowerError naming the hard way out."""
    pid = await _power_on_with_ipmitool(bmc, bmc_pid_file)

    with pytest.raises(PowerError) as caught:
        await IpmiDriver(bmc_config(bmc)).power_off(soft=True)

    assert "soft power off via ipmi" in str(caught.value)
    assert "power off without soft" in str(caught.value)
    assert pid_alive(pid)


async def test_power_reading_is_none_when_the_bmc_has_no_dcmi(bmc: IpmiSim) -> None:
    """Pins that a BMC without DCMI (ipmi_sim) gives no reading rather than an error."""
    assert await IpmiDriver(bmc_config(bmc)).power_reading_w() is None


def test_dcmi_power_reading_is_decoded() -> None:
    """Pins the DCMI Get Power Reading layout: current watts at bytes 1-2, 'active' at byte 17 bit 6."""
    reading = bytes([0xDC]) + (230).to_bytes(2, "little") + bytes(14) + bytes([0x40])
    assert parse_dcmi_power_reading(reading) == 230.0
    assert parse_dcmi_power_reading(reading[:-1] + bytes([0x00])) is None  # not measuring
    assert parse_dcmi_power_reading(bytes([0x00, 0x10, 0x00])) is None  # not DCMI


def test_bmc_settings_are_checked_and_keep_the_password_out_of_repr() -> None:
    """Pins BmcConfig validation and that its repr (and so logs) never shows the password."""
    config = BmcConfig(host_id="h1", address="10.0.0.5", username="admin", password="s3cret")
    assert "s3cret" not in repr(config)
    assert config.target == "BMC 10.0.0.5:623"
    with pytest.raises(ValueError, match="host 'h1': invalid BMC settings: port 0 is not a UDP port"):
        BmcConfig(host_id="h1", address="10.0.0.5", username="a", password="b", port=0)


async def test_a_call_after_a_timeout_waits_for_the_abandoned_one() -> None:
    """Pins that calls to one BMC never interleave: after a timeout the next call waits for the old one."""
    driver = IpmiDriver(dead_bmc_config(timeout_s=0.3))
    with pytest.raises(PowerError, match=r"no answer within 0\.3s"):
        await driver.status()

    with pytest.raises(PowerError, match=r"the previous call to this BMC was still running after 0\.3s"):
        await driver.status()
