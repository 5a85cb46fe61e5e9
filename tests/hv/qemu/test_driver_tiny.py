"""The qemu engine with the tiny guest: lifecycle, events, re-attach, crashes, stats. Real QEMU (TCG)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path

import pytest

from hv.driver import DriverEvent, EngineError, InvalidState, UnknownVm, VmExists
from hv.qemu.driver import QemuDriver
from tests.hv.qemu.conftest import MakeDriver
from tests.support.qemu import (
    Guests,
    counter_values,
    pid_alive,
    read_bytes,
    tiny_spec,
    until,
    wait_for_text,
)


async def started(driver: QemuDriver, guests: Guests, name: str = "tiny-1", **fields: object) -> Path:
    """Define and start a tiny guest, wait for READY; return its serial log."""
    await driver.define(tiny_spec(name, guests, **fields))  # type: ignore[arg-type]
    status = await driver.start(name)
    assert status.state == "running"
    log = driver.serial_log_path(name)
    await wait_for_text(log, "READY", 10)
    return log


async def wait_events(events: list[DriverEvent], count: int, timeout: float = 5.0) -> list[DriverEvent]:
    await until(lambda: len(events) >= count, timeout, f"{count} driver events (got {events})")
    return events


async def test_tiny_guest_boots_to_ready_in_a_private_detached_sandboxed_qemu(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """start() returns running; READY reaches the serial log; QEMU is sandboxed, in its own session."""
    driver = await make_driver()
    log = await started(driver, guests)
    pid = driver.qemu_pid("tiny-1")
    assert pid is not None and pid_alive(pid)
    assert os.getsid(pid) == pid, "QEMU leads its own session, so the agent's signals do not reach it"
    argv = read_bytes(Path(f"/proc/{pid}/cmdline")).split(b"\0")
    assert b"-sandbox" in argv and b"-nodefaults" in argv
    vm_dir = driver.vm_dir("tiny-1")
    assert stat.S_IMODE(vm_dir.stat().st_mode) == 0o700
    assert (vm_dir / "qmp.sock").exists() and (vm_dir / "qemu.pid").read_text().strip() == str(pid)
    assert [s.state for s in await driver.list()] == ["running"]
    await wait_for_text(log, "count=1", 5)


async def test_pause_stops_the_counter_and_resume_continues_it(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """A paused guest's virtual clock stops: no count line while paused, counting on after resume."""
    driver = await make_driver()
    log = await started(driver, guests)
    await wait_for_text(log, "count=1", 5)
    assert (await driver.pause("tiny-1")).state == "paused"
    frozen = counter_values(log.read_text())
    await asyncio.sleep(2.2)
    assert counter_values(log.read_text()) == frozen
    assert (await driver.resume("tiny-1")).state == "running"
    await wait_for_text(log, f"count={frozen[-1] + 1}\n", 4)
    assert [s.state for s in await driver.list()] == ["running"]
    assert events == [], "QMP's STOP and RESUME for the driver's own calls are not reported as events"


async def test_shutdown_of_a_guest_without_acpi_falls_back_to_destroy(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """The tiny guest ignores the power button: after the timeout the VM is destroyed and says so."""
    driver = await make_driver()
    await started(driver, guests)
    pid = driver.qemu_pid("tiny-1")
    assert pid is not None
    shutting_down = asyncio.ensure_future(driver.shutdown("tiny-1", 0.5))
    states: list[str] = []
    for _ in range(100):
        states = [s.state for s in await driver.list()]
        if states == ["stopping"]:
            break
        await asyncio.sleep(0.01)
    assert states == ["stopping"], "while the guest is asked to power off, the VM is stopping"
    status = await shutting_down
    # Stopping, then this reason: the 0.5 s fallback destroyed it. A driver that waited far past it
    # hits the per-test timeout; a stopwatch here measured the machine's load more than the driver.
    assert status.state == "stopped" and "did not power off within 0.5s" in status.reason
    assert not pid_alive(pid) and driver.qemu_pid("tiny-1") is None
    await asyncio.sleep(0.2)
    assert events == [], "the driver does not report the outcome of its own calls"


async def test_a_cancelled_shutdown_leaves_the_vm_running_and_watched(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """Cancelling shutdown() mid-wait: the VM is running again, and a later crash is still reported."""
    driver = await make_driver()
    await started(driver, guests)
    shutting_down = asyncio.ensure_future(driver.shutdown("tiny-1", 30))
    await asyncio.sleep(0.3)
    shutting_down.cancel()
    with pytest.raises(asyncio.CancelledError):
        await shutting_down
    [status] = await driver.list()
    assert status.state == "running"
    pid = driver.qemu_pid("tiny-1")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    [event] = await wait_events(events, 1)
    assert (event.event, event.state) == ("crashed", "crashed")


async def test_a_new_driver_reattaches_to_vms_that_outlived_the_old_one(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """close() leaves QEMU running; a new driver on the same state dir finds and controls it."""
    first = await make_driver()
    log = await started(first, guests)
    pid = first.qemu_pid("tiny-1")
    assert pid is not None
    await first.close()
    assert pid_alive(pid), "closing the driver must not stop its VMs"
    await wait_for_text(log, "count=1", 5)

    second = await make_driver()
    [status] = await second.list()
    assert (status.name, status.state) == ("tiny-1", "running")
    assert second.qemu_pid("tiny-1") == pid
    assert (await second.pause("tiny-1")).state == "paused"
    assert (await second.resume("tiny-1")).state == "running"
    [sample] = await second.stats()
    assert sample.name == "tiny-1" and sample.state == "running"
    assert (await second.destroy("tiny-1")).state == "stopped"
    assert not pid_alive(pid)


async def test_two_drivers_cannot_share_a_state_directory(make_driver: MakeDriver) -> None:
    """The second driver on a state dir is refused with an error that says what to do."""
    await make_driver()
    with pytest.raises(EngineError, match="another qemu driver"):
        await make_driver()


async def test_kill_9_of_qemu_is_reported_as_a_crash_and_the_vm_can_start_again(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """QEMU killed by SIGKILL: a crashed event with the signal in the reason, then start() works."""
    driver = await make_driver()
    await started(driver, guests)
    pid = driver.qemu_pid("tiny-1")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    [event] = await wait_events(events, 1)
    assert (event.vm, event.event, event.state) == ("tiny-1", "crashed", "crashed")
    assert "SIGKILL" in event.reason
    [status] = await driver.list()
    assert status.state == "crashed" and "SIGKILL" in status.reason
    assert (await driver.start("tiny-1")).state == "running"
    await wait_for_text(driver.serial_log_path("tiny-1"), "READY", 10)


async def test_a_qemu_that_died_while_no_driver_was_attached_shows_as_crashed(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """Re-attaching to a VM whose QEMU is gone: state crashed, with an event, and destroy clears it."""
    first = await make_driver()
    await started(first, guests)
    pid = first.qemu_pid("tiny-1")
    assert pid is not None
    await first.close()
    os.kill(pid, signal.SIGKILL)
    await until(lambda: not pid_alive(pid), 5, "QEMU gone")
    second = await make_driver()
    [status] = await second.list()
    assert status.state == "crashed" and "no agent was attached" in status.reason
    assert [(e.event, e.state) for e in events] == [("crashed", "crashed")]
    assert (await second.destroy("tiny-1")).state == "stopped"


async def test_qemu_stopped_by_a_signal_from_outside_is_reported_as_stopped(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """SIGTERM to QEMU: QMP says SHUTDOWN (host-signal); the driver reports a stop, not a crash."""
    driver = await make_driver()
    await started(driver, guests)
    pid = driver.qemu_pid("tiny-1")
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    [event] = await wait_events(events, 1)
    assert (event.event, event.state) == ("stopped", "stopped")
    assert "host-signal" in event.reason


async def test_a_guest_that_resets_itself_is_reported_as_rebooted(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """The tiny guest triple-faults after 1 s (reset_after_s=1): a rebooted event; it boots again."""
    driver = await make_driver()
    await driver.define(tiny_spec("tiny-1", guests, extra_cmdline="reset_after_s=1"))
    await driver.start("tiny-1")
    log = driver.serial_log_path("tiny-1")
    await wait_for_text(log, "RESETTING", 10)
    [event] = await wait_events(events, 1)
    assert (event.event, event.state) == ("rebooted", "running")
    text = await wait_for_text(log, "READY", 5, after=log.read_text().index("RESETTING"))
    assert text.count("READY") >= 2


async def test_reboot_resets_the_guest(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """reboot() is QMP system_reset: the guest boots again (a second READY); no event of its own."""
    driver = await make_driver()
    log = await started(driver, guests)
    await wait_for_text(log, "count=1", 5)
    assert (await driver.reboot("tiny-1")).state == "running"
    text = await wait_for_text(log, "READY", 5, after=log.read_text().rindex("count="))
    assert text.count("READY") == 2
    await asyncio.sleep(0.2)
    assert events == []


async def test_stats_report_cpu_memory_and_the_dirty_rate_the_guest_makes(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """stats(): CPU share of QEMU, the VM's memory, and calc-dirty-rate near the guest's 40 MiB/s."""
    driver = await make_driver()
    await started(driver, guests, dirty_mib_s=40, memory_mib=128)
    samples = []
    for _ in range(4):
        [sample] = await driver.stats()
        samples.append(sample)
        await asyncio.sleep(1.05)
    assert all(0.0 <= s.cpu_util <= 1.0 for s in samples)
    assert all(s.memory_mib == 128 for s in samples)
    dirty = [s.dirty_mib_s for s in samples if s.dirty_mib_s > 0]
    assert dirty, f"no dirty rate measured: {samples}"
    assert 15 <= max(dirty) <= 80, f"the guest dirties 40 MiB/s; measured {dirty}"
    await driver.pause("tiny-1")
    [paused] = await driver.stats()
    assert paused.state == "paused" and paused.dirty_mib_s == 0.0


async def test_lifecycle_errors_name_the_vm_and_the_way_out(make_driver: MakeDriver, guests: Guests) -> None:
    """Wrong-state calls, unknown names and duplicates raise the driver errors with a fix in the text."""
    driver = await make_driver()
    await started(driver, guests)
    with pytest.raises(InvalidState, match=r"'tiny-1'.*already powered on"):
        await driver.start("tiny-1")
    with pytest.raises(InvalidState, match="stop it first"):
        await driver.undefine("tiny-1")
    with pytest.raises(InvalidState, match="already running"):
        await driver.resume("tiny-1")
    with pytest.raises(VmExists, match="undefine the existing VM"):
        await driver.define(tiny_spec("tiny-1", guests))
    with pytest.raises(UnknownVm, match=r"'nope'.*VMs here: tiny-1"):
        await driver.pause("nope")
    await driver.destroy("tiny-1")
    assert (await driver.destroy("tiny-1")).state == "stopped", "destroying a stopped VM changes nothing"
    with pytest.raises(InvalidState, match="powered off; start it first"):
        await driver.reboot("tiny-1")


async def test_a_qemu_that_fails_to_start_is_explained_and_leaves_nothing_behind(
    make_driver: MakeDriver, guests: Guests, tmp_path: Path
) -> None:
    """A kernel QEMU cannot load: start() raises with QEMU's own words; the VM stays defined."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "not-a-kernel").write_bytes(guests.tiny.read_bytes()[:64])  # a truncated ELF
    driver = await make_driver(image_dirs=[guests.dir, images])
    await driver.define(tiny_spec("broken", guests, kernel=images / "not-a-kernel"))
    with pytest.raises(EngineError) as failed:
        await driver.start("broken")
    text = str(failed.value)
    assert text.startswith("vm 'broken' did not start: qemu exited at once (exit status 1)")
    assert "qemu said: Error while loading elf kernel" in text, "QEMU's own complaint is quoted"
    assert "qemu.log" in text
    [status] = await driver.list()
    assert status.state == "defined" and driver.qemu_pid("broken") is None


async def test_undefine_forgets_the_vm_and_removes_its_directory(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """undefine() of a stopped VM deletes its runtime directory; a new VM may take the name."""
    driver = await make_driver()
    await started(driver, guests)
    vm_dir = driver.vm_dir("tiny-1")
    await driver.destroy("tiny-1")
    await driver.undefine("tiny-1")
    assert not vm_dir.exists() and await driver.list() == []
    assert (await driver.define(tiny_spec("tiny-1", guests))).state == "defined"
