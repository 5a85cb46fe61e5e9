"""The qemu engine with the Linux guest: virtio devices, overlays, balloon, ACPI shutdown. Real QEMU (TCG)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from hv.driver import DriverEvent
from protocols.vmspec import DiskSpec
from tests.hv.qemu.conftest import MakeDriver
from tests.support.needs import need
from tests.support.qemu import NO_LINUX_GUEST, Guests, linux_spec, pid_alive, until, wait_for_text

#: Under TCG the Linux guest needs about 3 s (microvm) to 4 s (pc) to reach userspace; the machine is shared.
BOOT_TIMEOUT_S = 40


@pytest.fixture
def linux(guests: Guests) -> Guests:
    need(guests.linux_kernel is not None and guests.linux_initrd is not None, NO_LINUX_GUEST)
    return guests


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    """An empty 64 MiB qcow2 base image in a second image directory."""
    images = tmp_path / "images"
    images.mkdir()
    base = images / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True, timeout=30)
    return base


def image_info(path: Path) -> dict[str, object]:
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    info: dict[str, object] = json.loads(done.stdout)
    return info


def devices_seen(serial: str) -> list[str]:
    line = next(line for line in serial.splitlines() if line.startswith("virtio-devices:"))
    return sorted(line.split(":", 1)[1].split())


async def test_linux_guest_on_microvm_sees_every_virtio_device_and_powers_off_on_acpi(
    make_driver: MakeDriver, linux: Guests, base_image: Path, events: list[DriverEvent]
) -> None:
    """Microvm (virtio-mmio): blk on a qcow2 overlay, net, console, rng, balloon; ACPI shutdown is graceful."""
    driver = await make_driver(image_dirs=[linux.dir, base_image.parent])
    spec = linux_spec(
        "linux-1",
        linux,
        machine="microvm",
        disks=[DiskSpec(target="vda", source=str(base_image), format="qcow2")],
        current_memory_mib=192,
    )
    await driver.define(spec)
    await driver.start("linux-1")
    serial = await wait_for_text(driver.serial_log_path("linux-1"), "virtio-devices:", BOOT_TIMEOUT_S)
    assert devices_seen(serial) == ["balloon", "blk", "console", "net", "rng"]

    info = image_info(driver.vm_dir("linux-1") / "disk-vda.qcow2")
    assert info["format"] == "qcow2" and info["full-backing-filename"] == str(base_image)
    [disk] = await driver.block_stats("linux-1")
    assert disk.target == "vda" and disk.rd_operations > 0, "the guest's virtio_blk probed the disk"

    memory: list[int] = []
    for _ in range(60):
        memory = [s.memory_mib for s in await driver.stats()]
        if memory == [192]:
            break
        await asyncio.sleep(0.25)
    assert memory == [192], "the guest's balloon driver gave back what current_memory_mib asks"

    pid = driver.qemu_pid("linux-1")
    assert pid is not None
    status = await driver.shutdown("linux-1", 20)
    # An empty reason means the guest powered itself off on the ACPI button; the 20 s fallback would
    # have destroyed it and said "did not power off within 20s". That, not a stopwatch, shows it.
    assert status.state == "stopped" and status.reason == "", status.reason
    assert not pid_alive(pid)
    assert "powering off" in driver.serial_log_path("linux-1").read_text()
    assert events == []


async def test_linux_guest_on_pc_uses_pci_virtio_and_a_guest_poweroff_is_reported(
    make_driver: MakeDriver, linux: Guests, events: list[DriverEvent]
) -> None:
    """Pc (virtio-pci): the guest lists its devices, then powers itself off: a shutdown event."""
    driver = await make_driver()
    spec = linux_spec("linux-2", linux, machine="pc", extra_cmdline="poweroff_after_s=1")
    await driver.define(spec)
    await driver.start("linux-2")
    serial = await wait_for_text(driver.serial_log_path("linux-2"), "virtio-devices:", BOOT_TIMEOUT_S)
    assert devices_seen(serial) == ["balloon", "console", "net", "rng"]
    await until(lambda: events, 15, "the guest's power-off reported")
    [event] = events
    assert (event.vm, event.event, event.state) == ("linux-2", "shutdown", "stopped")
    assert event.reason == "the guest powered itself off"
    [status] = await driver.list()
    assert status.state == "stopped"
