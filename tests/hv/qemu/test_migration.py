"""Live migration with the qemu engine: two drivers (source and destination host) on 127.0.0.1.

Real QEMU under TCG. Each side logs the guest's serial port to its own file, and the guest prints
``count=N`` every guest second. Read one after the other, the source's log and the destination's
must look like one uninterrupted run: READY once, then 1, 2, 3, ... with no gap and no repeat.
That shows the guest moved rather than restarted, and that its memory arrived up to date: the
counter lives in a page the guest writes a hundred times a second, the page QEMU 7.2 under TCG
used to deliver stale (see ``TCG_RAM_PAD_KIB`` in :mod:`hv.qemu.command_line`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hv.driver import DriverEvent, InvalidRequest, InvalidState, UnknownVm, VmExists
from hv.qemu import command_line, migration
from hv.qemu.driver import QemuDriver
from protocols.migration import ConvergenceGuard, GuardAction, MigrationPolicy, MigrationSample
from protocols.vmspec import BootSpec, DiskSpec, VmSpec
from tests.hv.qemu.conftest import MakeDriver
from tests.support.needs import need
from tests.support.qemu import (
    NO_LINUX_GUEST,
    Guests,
    counter_values,
    linux_spec,
    read_bytes,
    tiny_spec,
    until,
    wait_for_text,
)

HOST = "127.0.0.1"
ENDED = ("completed", "failed", "cancelled")

#: A guest that dirties memory faster than the link carries it: 16 MiB of RAM (12 MiB of it
#: dirtied, round after round) at 24 MiB/s over 12 MiB/s, allowed 10 ms of downtime. Measured here
#: under TCG: without auto-converge it never converges and the guard aborts it after 3-10 s; with
#: auto-converge QEMU throttles the vCPUs in 10% steps and it converges at about 80-90% in ~20 s.
#: (The tiny guest dirties on timer ticks, so a throttle only slows it once it makes it miss ticks.)
DIRTY_MIB_S = 24
DIRTY_MEMORY_MIB = 16
STUCK = MigrationPolicy(bandwidth_mib_s=12, max_downtime_ms=10, downtime_ceiling_ms=100, auto_converge=False)


async def pair(make_driver: MakeDriver, **options: object) -> tuple[QemuDriver, QemuDriver]:
    """A source and a destination driver, each on its own state directory."""
    return await make_driver("src", **options), await make_driver("dst", **options)


async def running_tiny(driver: QemuDriver, spec: VmSpec, *, counts: int = 1) -> int:
    """Define and start ``spec`` on ``driver``; wait until it has counted ``counts``; return its count."""
    await driver.define(spec)
    assert (await driver.start(spec.name)).state == "running"
    text = await wait_for_text(driver.serial_log_path(spec.name), f"count={counts}\n", 15)
    return counter_values(text)[-1]


async def state_of(driver: QemuDriver, name: str) -> tuple[str, str]:
    [status] = [s for s in await driver.list() if s.name == name]
    return status.state, status.reason


async def wait_state(driver: QemuDriver, name: str, state: str, timeout: float = 10.0) -> str:
    """Wait until the VM is in ``state``; return its reason."""
    deadline = time.monotonic() + timeout
    while True:
        now, reason = await state_of(driver, name)
        if now == state:
            return reason
        if time.monotonic() > deadline:
            raise AssertionError(f"vm {name} stayed {now} ({reason}), expected {state}")
        await asyncio.sleep(0.05)


async def wait_ended(driver: QemuDriver, name: str, timeout: float) -> MigrationSample:
    """Sample every 0.1 s until the migration has ended."""
    deadline = time.monotonic() + timeout
    while True:
        sample = await driver.migrate_sample(name)
        if sample.status in ENDED:
            return sample
        if time.monotonic() > deadline:
            raise AssertionError(f"the migration of {name} did not end within {timeout}s: {sample}")
        await asyncio.sleep(0.1)


async def wait_active(driver: QemuDriver, name: str, iteration: int = 2) -> MigrationSample:
    """Wait until the migration is past its first ``iteration - 1`` rounds."""
    deadline = time.monotonic() + 15
    while True:
        sample = await driver.migrate_sample(name)
        assert sample.status in ("setup", "active"), sample
        if sample.iteration >= iteration:
            return sample
        assert time.monotonic() < deadline, f"the migration of {name} made no round: {sample}"
        await asyncio.sleep(0.1)


def one_run(*logs: Path | str) -> list[int]:
    """The counter across serial logs read one after another; it must be one uninterrupted run."""
    text = "".join(log if isinstance(log, str) else log.read_text(errors="replace") for log in logs)
    counts = counter_values(text)
    assert text.count("READY") == 1, "the guest moved; it did not boot again"
    assert counts == list(range(1, len(counts) + 1)), f"the counter jumped or repeated: {counts}"
    return counts


async def counts_on(driver: QemuDriver, name: str, more: int = 1, timeout: float = 10.0) -> list[int]:
    """The VM's counter values, after waiting for ``more`` new ones."""
    log = driver.serial_log_path(name)
    seen = len(counter_values(read_bytes(log).decode(errors="replace")))
    await until(
        lambda: len(counter_values(read_bytes(log).decode(errors="replace"))) >= seen + more,
        timeout,
        f"{more} more count(s) on {log}",
    )
    return counter_values(read_bytes(log).decode(errors="replace"))


async def guard_migration(
    src: QemuDriver, name: str, policy: MigrationPolicy, timeout: float
) -> tuple[MigrationSample, list[GuardAction], int]:
    """Drive a running migration the way the source agent does: sample every 0.2 s, feed the
    ConvergenceGuard, apply what it says. Returns the last sample, the actions and the top throttle.
    """
    guard = ConvergenceGuard(policy)
    actions: list[GuardAction] = []
    top_throttle = 0
    deadline = time.monotonic() + timeout
    while True:
        sample = await src.migrate_sample(name)
        top_throttle = max(top_throttle, sample.throttle_pct)
        if sample.status in ENDED:
            return sample, actions, top_throttle
        action = guard.observe(sample, time.monotonic())
        if action.kind != "none":
            actions.append(action)
        if action.kind == "raise_downtime":
            await src.migrate_tune(name, downtime_ms=action.downtime_ms)
        elif action.kind == "postcopy":
            await src.migrate_postcopy(name)
        elif action.kind == "abort":
            status = await src.migrate_cancel(name)
            assert status.state == "running"
            return await src.migrate_sample(name), actions, top_throttle
        assert time.monotonic() < deadline, f"the guard decided nothing within {timeout}s: {sample}"
        await asyncio.sleep(0.2)


def qemu_io(image: Path, *commands: str) -> str:
    """Run qemu-io commands on a qcow2 image; their output (raises when one fails)."""
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run([*argv, str(image)], capture_output=True, text=True, timeout=30, check=True)
    assert "failed" not in done.stdout.lower() and "pattern verification" not in done.stdout, done.stdout
    return done.stdout


def make_overlay(overlay: Path, base: Path) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)]
    subprocess.run(argv, check=True, timeout=30)


# -------------------------------------------------------------------------------------------------


async def test_tiny_guest_moves_to_the_destination_and_its_counter_goes_on_there(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """Completed: the source is paused ("migrated away"), the destination runs on from the source's count."""
    src, dst = await pair(make_driver)
    spec = tiny_spec("mig-1", guests)
    before = await running_tiny(src, spec, counts=2)

    status, uri = await dst.migrate_incoming(spec, HOST)
    assert status.state == "incoming"
    assert re.fullmatch(r"tcp:127\.0\.0\.1:\d+", uri), uri
    assert (await dst.migrate_incoming(spec, HOST))[1] == uri, "a repeated call returns the same URI"
    assert (await src.migrate_sample("mig-1")).status == "none"
    assert not await dst.migrate_received("mig-1"), "nothing has arrived yet"

    await src.migrate_send("mig-1", uri, MigrationPolicy())
    sample = await wait_ended(src, "mig-1", 15)
    assert sample.status == "completed", sample
    # The destination may load the end of the stream for a moment after the source's last byte.
    for _ in range(150):
        if await dst.migrate_received("mig-1"):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the whole guest arrived, but the destination does not say so")
    # QEMU counts the downtime in whole milliseconds: under 1 ms reads 0 (about 1 migration in 20 here).
    assert 0 <= sample.downtime_ms <= sample.total_ms and sample.total_ms > 0, sample
    assert sample.total_bytes >= 64 * 1024 * 1024 and sample.transferred_bytes > 0

    state, reason = await state_of(src, "mig-1")
    assert state == "paused" and "migrated away" in reason and uri in reason
    await wait_state(dst, "mig-1", "running")  # no local disks: it started on its own
    assert (await dst.migrate_finish("mig-1")).state == "running"
    assert (await dst.migrate_finish("mig-1")).state == "running", "idempotent"
    assert not await dst.migrate_received("mig-1"), "finished: an ordinary VM, no longer incoming"

    dst_counts = await counts_on(dst, "mig-1", 2)
    first_leg = src.serial_log_path("mig-1").read_text()
    assert one_run(first_leg, dst.serial_log_path("mig-1"))[-1] == dst_counts[-1] > before

    with pytest.raises(InvalidState, match="already migrated"):
        await src.migrate_cancel("mig-1")
    with pytest.raises(InvalidState, match="would run it twice"):
        await src.resume("mig-1")
    await src.migrate_send("mig-1", uri, MigrationPolicy())  # a re-sent command attaches, changes nothing
    assert (await src.destroy("mig-1")).state == "stopped"
    await src.undefine("mig-1")
    assert await src.list() == []

    # And back: a copy that arrived by migration has sent nothing (QEMU itself says "completed").
    assert (await dst.migrate_sample("mig-1")).status == "none"
    _, back = await src.migrate_incoming(spec, HOST)
    await dst.migrate_send("mig-1", back, MigrationPolicy())
    assert (await wait_ended(dst, "mig-1", 15)).status == "completed"
    assert (await src.migrate_finish("mig-1")).state == "running"
    await counts_on(src, "mig-1", 1)
    one_run(first_leg, dst.serial_log_path("mig-1"), src.serial_log_path("mig-1"))
    assert events == [], "outcomes of the driver's own calls are not events"


async def test_migrate_wait_returns_on_qemus_migration_events_not_at_its_timeout(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """The source hears each status change (QMP MIGRATION) through migrate_wait, so the end of a
    migration is seen when it happens: no wait of 60 s lasts anywhere near that long. A sample taken
    right on the "completed" event still carries QEMU's total time.
    """
    src, dst = await pair(make_driver)
    spec = tiny_spec("mig-w", guests)
    await running_tiny(src, spec)
    _, uri = await dst.migrate_incoming(spec, HOST)
    await src.migrate_send("mig-w", uri, MigrationPolicy())
    samples: list[MigrationSample] = []
    while not samples or samples[-1].status not in ENDED:
        # A lost event would leave this wait hanging for its whole 60 s: the outer bound fails first.
        await asyncio.wait_for(src.migrate_wait("mig-w", 60), 20)
        samples.append(await src.migrate_sample("mig-w"))
    assert samples[-1].status == "completed", samples
    assert samples[-1].total_ms > 0, samples[-1]
    await src.migrate_wait("mig-w", 0.05)  # no news after the end: it waits out its timeout, no more
    with pytest.raises(UnknownVm):
        await src.migrate_wait("nope", 0.05)


async def test_linux_guest_moves_to_the_destination_and_keeps_counting(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """A booted Linux guest (virtio devices, user networking) continues on the destination."""
    need(guests.linux_kernel is not None and guests.linux_initrd is not None, NO_LINUX_GUEST)
    src, dst = await pair(make_driver)
    spec = linux_spec("mig-linux", guests, memory_mib=128)
    await src.define(spec)
    await src.start("mig-linux")
    text = await wait_for_text(src.serial_log_path("mig-linux"), "count=1", 40)
    assert "virtio-devices:" in text

    _, uri = await dst.migrate_incoming(spec, HOST)
    await src.migrate_send("mig-linux", uri, MigrationPolicy())
    sample = await wait_ended(src, "mig-linux", 30)
    assert sample.status == "completed", sample
    assert (await dst.migrate_finish("mig-linux")).state == "running"
    await counts_on(dst, "mig-linux", 2, timeout=15)
    one_run(src.serial_log_path("mig-linux"), dst.serial_log_path("mig-linux"))


async def test_a_guest_dirtying_faster_than_the_link_never_converges_and_the_guard_aborts(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """Without auto-converge: the guard raises the downtime, then aborts; the VM keeps running on its source."""
    src, dst = await pair(make_driver)
    spec = tiny_spec("mig-dirty", guests, dirty_mib_s=DIRTY_MIB_S, memory_mib=DIRTY_MEMORY_MIB)
    await running_tiny(src, spec)
    _, uri = await dst.migrate_incoming(spec, HOST, policy=STUCK)
    await src.migrate_send("mig-dirty", uri, STUCK)

    # guard_migration's timeout only stops a hung run: the guard decides on migration rounds, and the
    # order of its actions (raise, then abort) is what is checked, not how long the rounds took.
    sample, actions, throttle = await guard_migration(src, "mig-dirty", STUCK, timeout=25)
    assert [a.kind for a in actions] == ["raise_downtime", "abort"], actions
    assert actions[0].downtime_ms == STUCK.downtime_ceiling_ms
    assert "cannot converge" in actions[1].reason
    assert sample.status == "cancelled" and throttle == 0
    assert await state_of(src, "mig-dirty") == ("running", "")
    await counts_on(src, "mig-dirty", 1, timeout=5)
    one_run(src.serial_log_path("mig-dirty"))
    await wait_state(dst, "mig-dirty", "stopped")  # its QEMU exits when the stream is cancelled


async def test_telemetry_of_a_migrating_vm_reads_the_migrations_dirty_rate(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """While a VM migrates away, stats() reports the migration's own dirty-rate measurement at once,
    instead of starting calc-dirty-rate next to the stream (which slowed migrations by a third); a
    calc-dirty-rate would report nothing on its first sample.
    """
    src, dst = await pair(make_driver)
    spec = tiny_spec("mig-tel", guests, dirty_mib_s=DIRTY_MIB_S, memory_mib=DIRTY_MEMORY_MIB)
    await running_tiny(src, spec)
    _, uri = await dst.migrate_incoming(spec, HOST, policy=STUCK)
    await src.migrate_send("mig-tel", uri, STUCK)
    deadline = time.monotonic() + 15
    while (sample := await src.migrate_sample("mig-tel")).dirty_rate_bytes_s <= 0:
        assert sample.status == "active" and time.monotonic() < deadline, sample
        await asyncio.sleep(0.05)
    [stats] = await src.stats()
    migration_rate = sample.dirty_rate_bytes_s / (1024 * 1024)
    assert stats.name == "mig-tel" and stats.dirty_mib_s > 0, stats
    assert 0.5 * migration_rate <= stats.dirty_mib_s <= 2 * migration_rate, (stats, sample)
    await src.migrate_cancel("mig-tel")
    assert await state_of(src, "mig-tel") == ("running", "")


async def test_auto_converge_throttles_the_same_guest_until_it_converges(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """With auto-converge (the default) QEMU throttles the vCPUs step by step until pre-copy converges."""
    policy = MigrationPolicy(bandwidth_mib_s=12, max_downtime_ms=10, downtime_ceiling_ms=100)
    src, dst = await pair(make_driver)
    spec = tiny_spec("mig-throttle", guests, dirty_mib_s=DIRTY_MIB_S, memory_mib=DIRTY_MEMORY_MIB)
    await running_tiny(src, spec)
    _, uri = await dst.migrate_incoming(spec, HOST, policy=policy)
    await src.migrate_send("mig-throttle", uri, policy)

    sample, actions, throttle = await guard_migration(src, "mig-throttle", policy, timeout=45)
    assert sample.status == "completed", (sample, actions)
    assert "abort" not in [a.kind for a in actions]
    assert throttle >= 50, f"converged with a vCPU throttle of only {throttle}%"
    assert sample.downtime_ms <= 1000
    assert (await dst.migrate_finish("mig-throttle")).state == "running"
    await counts_on(dst, "mig-throttle", 1)
    one_run(src.serial_log_path("mig-throttle"), dst.serial_log_path("mig-throttle"))


async def test_a_destination_killed_mid_migration_fails_it_and_cancel_keeps_the_guest_on_its_source(
    make_driver: MakeDriver, guests: Guests, events: list[DriverEvent]
) -> None:
    """The destination's QEMU dies: the source's migration fails, migrate_cancel leaves it running."""
    src, dst = await pair(make_driver)
    spec = tiny_spec("mig-kill", guests, dirty_mib_s=DIRTY_MIB_S, memory_mib=DIRTY_MEMORY_MIB)
    await running_tiny(src, spec)
    _, uri = await dst.migrate_incoming(spec, HOST, policy=STUCK)
    await src.migrate_send("mig-kill", uri, STUCK)
    await wait_active(src, "mig-kill")
    with pytest.raises(InvalidState, match="does not allow post-copy"):
        await src.migrate_postcopy("mig-kill")
    with pytest.raises(InvalidState, match="is incoming"):
        await dst.migrate_cancel("mig-kill")

    pid = dst.qemu_pid("mig-kill")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    sample = await wait_ended(src, "mig-kill", 15)
    assert sample.status == "failed" and sample.error, sample
    await until(lambda: events, 5, "the destination's crash reported")
    [event] = events
    assert (event.vm, event.event, event.state) == ("mig-kill", "crashed", "crashed")
    assert "SIGKILL" in event.reason and "receiving the migration" in event.reason
    with pytest.raises(InvalidState, match="no received copy"):
        await dst.migrate_finish("mig-kill")

    status = await src.migrate_cancel("mig-kill")
    assert status.state == "running"
    await counts_on(src, "mig-kill", 2, timeout=5)
    one_run(src.serial_log_path("mig-kill"))
    assert (await src.migrate_cancel("mig-kill")).state == "running", "a repeated rollback is harmless"

    assert (await dst.destroy("mig-kill")).state == "stopped"
    vm_dir = dst.vm_dir("mig-kill")
    await dst.undefine("mig-kill")
    assert await dst.list() == [] and not vm_dir.exists()


async def test_agents_restarted_on_both_sides_mid_migration_reattach_and_complete_it(
    make_driver: MakeDriver, guests: Guests
) -> None:
    """New drivers on the same state dirs see the migration, a re-sent migrate_send attaches, it completes."""
    src, dst = await pair(make_driver)
    spec = tiny_spec("mig-restart", guests, dirty_mib_s=DIRTY_MIB_S, memory_mib=DIRTY_MEMORY_MIB)
    await running_tiny(src, spec)
    _, uri = await dst.migrate_incoming(spec, HOST, policy=STUCK)
    await src.migrate_send("mig-restart", uri, STUCK)
    first = await wait_active(src, "mig-restart")
    src_pid, dst_pid = src.qemu_pid("mig-restart"), dst.qemu_pid("mig-restart")
    await src.close()
    await dst.close()

    src, dst = await pair(make_driver)
    assert (src.qemu_pid("mig-restart"), dst.qemu_pid("mig-restart")) == (src_pid, dst_pid)
    assert await state_of(dst, "mig-restart") == ("incoming", f"waiting for the migration stream on {uri}")
    assert (await dst.migrate_incoming(spec, HOST, policy=STUCK))[1] == uri
    assert (await state_of(src, "mig-restart"))[0] == "running"
    sample = await src.migrate_sample("mig-restart")
    assert sample.status == "active" and sample.iteration >= first.iteration, sample
    await src.migrate_send("mig-restart", uri, STUCK)  # the re-sent command attaches
    assert (await src.migrate_sample("mig-restart")).transferred_bytes >= sample.transferred_bytes
    with pytest.raises(InvalidState, match="already migrating"):
        await src.migrate_send("mig-restart", "tcp:127.0.0.1:9", STUCK)

    await src.migrate_tune("mig-restart", downtime_ms=5000)  # now the rest fits in the downtime
    sample = await wait_ended(src, "mig-restart", 20)
    assert sample.status == "completed", sample
    assert (await state_of(src, "mig-restart"))[0] == "paused"
    assert (await dst.migrate_finish("mig-restart")).state == "running"
    await counts_on(dst, "mig-restart", 1)
    one_run(src.serial_log_path("mig-restart"), dst.serial_log_path("mig-restart"))


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    """A 64 MiB qcow2 base image in its own image directory, 0x11 in its first 4 MiB."""
    images = tmp_path / "images"
    images.mkdir()
    base = images / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True, timeout=30)
    qemu_io(base, "write -P 0x11 0 4M")
    return base


async def test_copy_storage_mirrors_the_overlay_to_the_destination_over_nbd(
    make_driver: MakeDriver, guests: Guests, base_image: Path
) -> None:
    """The source overlay's own data arrives in the destination's overlay on the same base image."""
    src, dst = await pair(make_driver, image_dirs=[guests.dir, base_image.parent])
    spec = tiny_spec(
        "mig-disk", guests, disks=[DiskSpec(target="vda", source=str(base_image), format="qcow2")]
    )
    await src.define(spec)
    overlay = src.vm_dir("mig-disk") / "disk-vda.qcow2"
    make_overlay(overlay, base_image)  # start() uses an overlay that exists
    qemu_io(overlay, "write -P 0xab 1M 2M")
    await src.start("mig-disk")
    await wait_for_text(src.serial_log_path("mig-disk"), "count=1\n", 10)

    with pytest.raises(InvalidRequest, match=r"local disks .* vda .*copy_storage=True"):
        await src.migrate_send("mig-disk", "tcp:127.0.0.1:9", MigrationPolicy())
    assert (await state_of(src, "mig-disk"))[0] == "running", "refused input changes nothing"

    policy = MigrationPolicy(copy_storage=True)
    status, uri = await dst.migrate_incoming(spec, HOST, policy=policy)
    assert status.state == "incoming"
    assert re.fullmatch(r"tcp:127\.0\.0\.1:\d+;nbd=127\.0\.0\.1:\d+", uri), uri
    with pytest.raises(InvalidRequest, match="names no NBD server"):
        await src.migrate_send("mig-disk", uri.split(";")[0], policy)

    await src.migrate_send("mig-disk", uri, policy)
    sample = await wait_ended(src, "mig-disk", 20)
    assert sample.status == "completed", sample
    assert (await state_of(dst, "mig-disk"))[0] == "incoming", "it waits paused until migrate_finish"
    assert (await dst.migrate_finish("mig-disk")).state == "running"
    await counts_on(dst, "mig-disk", 1)
    one_run(src.serial_log_path("mig-disk"), dst.serial_log_path("mig-disk"))

    await dst.destroy("mig-disk")
    copied = dst.vm_dir("mig-disk") / "disk-vda.qcow2"
    qemu_io(copied, "read -P 0xab 1M 2M", "read -P 0x11 0 1M", "read -P 0x11 3M 1M")
    await src.destroy("mig-disk")
    await src.undefine("mig-disk")
    qemu_io(base_image, "read -P 0x11 0 4M", "read -P 0 4M 1M")  # undefine left the shared base alone


async def test_bad_migration_requests_are_refused_with_errors_that_say_why(
    make_driver: MakeDriver, guests: Guests, tmp_path: Path
) -> None:
    """Unknown or stopped VMs, a finish before the stream, a taken name, a missing base image, a bad URI."""
    src, dst = await pair(make_driver, image_dirs=[guests.dir, tmp_path])
    spec = tiny_spec("mig-bad", guests)
    with pytest.raises(UnknownVm, match="'nope' is not defined"):
        await src.migrate_send("nope", "tcp:127.0.0.1:9", MigrationPolicy())
    await src.define(spec)
    with pytest.raises(InvalidState, match="is defined; migrate_send needs it running"):
        await src.migrate_send("mig-bad", "tcp:127.0.0.1:9", MigrationPolicy())
    await src.start("mig-bad")
    with pytest.raises(InvalidRequest, match="is not tcp:HOST:PORT"):
        await src.migrate_send("mig-bad", "unix:/tmp/x", MigrationPolicy())
    with pytest.raises(InvalidRequest, match="bandwidth_mib_s must be a positive number"):
        await src.migrate_send("mig-bad", "tcp:127.0.0.1:9", MigrationPolicy(bandwidth_mib_s=0))
    with pytest.raises(InvalidState, match="no pre-copy migration under way"):
        await src.migrate_tune("mig-bad", downtime_ms=100)
    assert (await src.migrate_cancel("mig-bad")).state == "running", "nothing to cancel: it just runs"

    _, uri = await dst.migrate_incoming(spec, HOST)
    with pytest.raises(InvalidState, match="still receiving its migration"):
        await dst.migrate_finish("mig-bad")
    with pytest.raises(VmExists, match="already exists"):
        await src.migrate_incoming(spec, HOST)
    with pytest.raises(InvalidState, match="is incoming"):
        await dst.migrate_send("mig-bad", uri, MigrationPolicy())

    missing = tmp_path / "gone.qcow2"
    lost = tiny_spec("mig-lost", guests, disks=[DiskSpec(target="vda", source=str(missing), format="qcow2")])
    with pytest.raises(
        InvalidRequest, match=re.escape(f"{missing} does not exist") + ".*same paths on both hosts"
    ):
        await dst.migrate_incoming(lost, HOST, policy=MigrationPolicy(copy_storage=True))
    with pytest.raises(InvalidRequest, match=re.escape("cannot listen for the migration on '192.0.2.1'")):
        await dst.migrate_incoming(tiny_spec("mig-far", guests), "192.0.2.1")
    assert [s.name for s in await dst.list()] == ["mig-bad"], "refused requests leave nothing behind"
    assert sorted(p.name for p in (dst.state_dir / "vms").iterdir()) == ["mig-bad"]


# -- pure: no QEMU -------------------------------------------------------------------------------


def test_the_uri_carries_memory_and_nbd_addresses_and_bad_ones_are_explained() -> None:
    """tcp:HOST:PORT[;nbd=HOST:PORT] round-trips (IPv6 in brackets); anything else says what to pass."""
    plain = migration.parse_uri("vm-1", "tcp:10.0.0.2:4444")
    assert (plain.qemu_uri, plain.has_nbd) == ("tcp:10.0.0.2:4444", False)
    both = migration.parse_uri("vm-1", "tcp:[fd00::2]:4444;nbd=[fd00::2]:4445")
    assert (both.host, both.port, both.nbd_host, both.nbd_port) == ("fd00::2", 4444, "fd00::2", 4445)
    assert both.qemu_uri == "tcp:[fd00::2]:4444" and str(both) == "tcp:[fd00::2]:4444;nbd=[fd00::2]:4445"
    assert migration.format_uri("h", 1, "h", 2) == "tcp:h:1;nbd=h:2"
    for bad in ("unix:/tmp/s", "tcp:host", "tcp:host:0", "tcp:h:1;nbd=h", "tcp:h:1;rdma=h:2", "tcp::1"):
        with pytest.raises(InvalidRequest, match="migrate_incoming returned"):
            migration.parse_uri("vm-1", bad)


def test_the_destination_runs_the_sources_command_line_plus_incoming_defer() -> None:
    """Same devices on both ends; -S only when disks are copied; TCG pads the RAM by 8 KiB."""
    spec = VmSpec(name="vm-1", memory_mib=64, boot=BootSpec(kernel="/images/k"))
    source = command_line.LaunchPlan(
        spec=spec, accel="tcg", vm_dir=Path("/vms/vm-1"), kernel=Path("/images/k"), ram_pad_kib=8
    )
    argv = command_line.build_argv("qemu", source)
    incoming = command_line.build_argv("qemu", dataclasses.replace(source, incoming=True))
    paused = command_line.build_argv("qemu", dataclasses.replace(source, incoming=True, start_paused=True))
    assert "-incoming" not in argv and "-S" not in argv
    assert [a for a in incoming if a not in ("-incoming", "defer")] == argv
    assert [a for a in paused if a not in ("-incoming", "defer", "-S")] == argv
    assert argv[argv.index("-m") + 1] == "65544K"  # 64 MiB + 8 KiB: not a multiple of 256 KiB
    kvm = command_line.build_argv("qemu", dataclasses.replace(source, accel="kvm", ram_pad_kib=0))
    assert kvm[kvm.index("-m") + 1] == "64M"


def test_query_migrate_maps_to_a_sample_in_the_engines_units() -> None:
    """Pages/s and Mbit/s become bytes/s; QEMU's inner steps fold into active; errors only when failed."""
    active = migration.sample_from_query(
        {
            "status": "pre-switchover",
            "expected-downtime": 40,
            "cpu-throttle-percentage": 30,
            "ram": {
                "total": 1000,
                "transferred": 600,
                "remaining": 400,
                "dirty-pages-rate": 10,
                "page-size": 4096,
                "mbps": 8.0,
                "dirty-sync-count": 3,
            },
        }
    )
    assert active == MigrationSample(
        status="active",
        total_bytes=1000,
        transferred_bytes=600,
        remaining_bytes=400,
        dirty_rate_bytes_s=40960.0,
        bandwidth_bytes_s=1e6,
        iteration=3,
        expected_downtime_ms=40.0,
        throttle_pct=30,
    )
    done = migration.sample_from_query({"status": "completed", "downtime": 12, "total-time": 900})
    assert (done.status, done.downtime_ms, done.total_ms) == ("completed", 12.0, 900.0)
    failed = migration.sample_from_query({"status": "failed", "error-desc": "Connection reset"})
    assert (failed.status, failed.error) == ("failed", "Connection reset")
    assert migration.sample_from_query({"status": "postcopy-paused"}).status == "postcopy-active"
    assert migration.sample_from_query({}).status == "none"
