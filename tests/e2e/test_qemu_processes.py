"""End to end with real QEMU: controller, Mosquitto and a qemu agent as processes, the tiny guest as the VM.

The agent runs as ``fleetvisor agent --hv qemu --state-dir DIR`` with no other qemu option, so its
image directory is the default ``DIR/images``, where the test copies the tiny guest. Every process
(controller, agents, QEMU) is stopped by PID when the test ends.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec

from tests.support import free_port
from tests.support.processes import Proc, start_process_fleet, wait_for
from tests.support.qemu import (
    counter_values,
    kill_qemus_under,
    linux_spec,
    pid_alive,
    require_guests,
    tiny_spec,
)


def test_a_qemu_vm_through_the_api_survives_its_agent_being_killed(
    mosquitto: Any, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """Create the tiny guest via the API, kill -9 the agent (QEMU runs on), restart it, stop and delete."""
    guests = require_guests()
    state_dir = tmp_path / "h1"
    images = state_dir / "images"
    images.mkdir(parents=True)
    shutil.copy(guests.tiny, images / "tiny.elf")
    try:
        _scenario(mosquitto.url, procs, tmp_path, state_dir, images / "tiny.elf")
    finally:
        kill_qemus_under(state_dir)


def _scenario(broker: str, procs: Callable[..., Proc], tmp_path: Path, state_dir: Path, kernel: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1"
    controller = procs(
        "controller",
        "controller",
        "--enrolment",
        "open",
        "--broker",
        broker,
        "--db",
        str(tmp_path / "c.sqlite"),
        "--port",
        str(port),
    )
    agent_args = (
        "agent",
        "--host-id",
        "h1",
        "--broker",
        broker,
        "--hv",
        "qemu",
        "--state-dir",
        str(state_dir),
    )
    agent = procs("agent", *agent_args, "--telemetry-interval", "0.5")
    everyone = [controller, agent]

    def host() -> dict[str, Any] | None:
        found = httpx.get(f"{url}/hosts", timeout=2).json()
        return found[0] if found and found[0]["online"] else None

    joined = wait_for(host, 30, "the qemu host online", everyone)
    caps = joined["capabilities"]
    assert caps["engine"] == "qemu" and caps["accel"] in ("kvm", "tcg") and "microvm" in caps["machine_types"]

    spec = {
        "name": "tiny-e2e",
        "memory_mib": 64,
        "machine": "microvm",
        "boot": {"kernel": str(kernel), "cmdline": "dirty_mib_s=5"},
        "console": False,
        "rng": False,
        "balloon": False,
    }
    created = httpx.post(f"{url}/vms", params={"wait": 30}, json=spec, timeout=40).json()
    assert created["operation"]["state"] == "succeeded", created
    assert (created["vm"]["state"], created["vm"]["host_id"]) == ("running", "h1")
    vm_dir = state_dir / "vms" / "tiny-e2e"
    serial = vm_dir / "serial.log"
    wait_for(lambda: b"count=1" in serial.read_bytes(), 10, "the guest's counter", everyone)
    wait_for(
        lambda: httpx.get(f"{url}/vms/tiny-e2e", timeout=2).json()["load"] is not None,
        10,
        "telemetry of the VM",
        everyone,
    )
    pid = int((vm_dir / "qemu.pid").read_text())

    # A spec whose kernel is outside the image directory is refused by the agent, with the reason.
    escape = {**spec, "name": "escape", "boot": {"kernel": "/etc/passwd"}}
    refused = httpx.post(f"{url}/vms", params={"wait": 30}, json=escape, timeout=40).json()
    assert refused["operation"]["state"] == "failed", refused
    assert "outside the image directories" in refused["operation"]["error"]

    # The agent dies; its VM does not.
    agent.popen.kill()
    agent.popen.wait(5)
    before = counter_values(serial.read_text())[-1]
    time.sleep(1.5)
    assert pid_alive(pid), "QEMU must outlive its agent"
    assert counter_values(serial.read_text())[-1] > before, "the guest kept running"

    agent = procs("agent-2", *agent_args, "--telemetry-interval", "0.5")
    everyone = [controller, agent]
    wait_for(host, 30, "the qemu host back online", everyone)
    vm = wait_for(
        lambda: (v := httpx.get(f"{url}/vms/tiny-e2e", timeout=2).json())["state"] == "running" and v,
        10,
        "the VM reported running again",
        everyone,
    )
    assert vm["host_id"] == "h1" and int((vm_dir / "qemu.pid").read_text()) == pid

    # Graceful stop: the tiny guest ignores ACPI, so the agent destroys it after the timeout.
    stopped = httpx.post(
        f"{url}/vms/tiny-e2e/stop", params={"wait": 30}, json={"force": False, "timeout_s": 1}, timeout=40
    ).json()
    assert stopped["state"] == "succeeded", stopped
    wait_for(lambda: not pid_alive(pid), 5, "QEMU gone", everyone)
    assert httpx.get(f"{url}/vms/tiny-e2e", timeout=2).json()["state"] == "stopped"

    deleted = httpx.delete(f"{url}/vms/tiny-e2e", params={"wait": 30}, timeout=40).json()
    assert deleted["state"] == "succeeded", deleted
    wait_for(lambda: not vm_dir.exists(), 5, "the VM directory removed", everyone)


def test_both_guests_through_the_api_pause_resume_shut_down_and_report_a_killed_qemu(
    mosquitto: Any, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """Tiny guest: pause stops its counter, resume restarts it, kill -9 of QEMU is reported as crashed.
    Linux guest: READY and its virtio devices on the serial log, then a graceful ACPI shutdown.
    """
    guests = require_guests(linux=True)
    state_dir = tmp_path / "h1"
    images = state_dir / "images"
    images.mkdir(parents=True)
    for source in (guests.tiny, guests.linux_kernel, guests.linux_initrd):
        assert source is not None
        shutil.copy(source, images / source.name)
    guests_here = dataclasses.replace(
        guests,
        tiny=images / guests.tiny.name,
        linux_kernel=images / guests.linux_kernel.name,  # type: ignore[union-attr]
        linux_initrd=images / guests.linux_initrd.name,  # type: ignore[union-attr]
    )
    fleet = start_process_fleet(
        procs, mosquitto.url, tmp_path, agent_args=("--hv", "qemu", "--telemetry-interval", "0.5")
    )
    api = f"{fleet.url}/api/v1"
    try:
        tiny = msgspec.to_builtins(tiny_spec("tiny-life", guests_here, machine="pc"))
        created = httpx.post(f"{api}/vms", params={"wait": 30}, json=tiny, timeout=40).json()
        assert created["operation"]["state"] == "succeeded", created
        serial = state_dir / "vms" / "tiny-life" / "serial.log"
        wait_for(lambda: b"count=2" in serial.read_bytes(), 15, "the counter", fleet.all)

        assert (
            httpx.post(f"{api}/vms/tiny-life/pause", params={"wait": 15}, timeout=20).json()["state"]
            == "succeeded"
        )
        assert httpx.get(f"{api}/vms/tiny-life", timeout=5).json()["state"] == "paused"
        frozen = counter_values(serial.read_text())[-1]
        time.sleep(2.5)
        assert counter_values(serial.read_text())[-1] == frozen, "a paused guest does not count"
        assert (
            httpx.post(f"{api}/vms/tiny-life/resume", params={"wait": 15}, timeout=20).json()["state"]
            == "succeeded"
        )
        wait_for(lambda: counter_values(serial.read_text())[-1] > frozen, 5, "counting again", fleet.all)

        pid = int((state_dir / "vms" / "tiny-life" / "qemu.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: httpx.get(f"{api}/vms/tiny-life", timeout=5).json()["state"] == "crashed",
            10,
            "crashed",
            fleet.all,
        )
        events = httpx.get(f"{api}/events", params={"limit": 1000}, timeout=5).json()
        assert any(e["type"] == "vm.crashed" and e["vm"] == "tiny-life" for e in events)

        linux = msgspec.to_builtins(linux_spec("linux-life", guests_here))
        created = httpx.post(f"{api}/vms", params={"wait": 60}, json=linux, timeout=70).json()
        assert created["operation"]["state"] == "succeeded", created
        console = state_dir / "vms" / "linux-life" / "serial.log"
        wait_for(lambda: b"READY" in console.read_bytes(), 30, "the Linux guest's READY", fleet.all)
        wait_for(
            lambda: b"net" in console.read_bytes() and b"rng" in console.read_bytes(),
            10,
            "virtio list",
            fleet.all,
        )
        stopped = httpx.post(
            f"{api}/vms/linux-life/stop", params={"wait": 40}, json={"timeout_s": 30}, timeout=50
        ).json()
        assert stopped["state"] == "succeeded", stopped
        assert httpx.get(f"{api}/vms/linux-life", timeout=5).json()["state"] == "stopped"
        kinds = [
            e["type"]
            for e in httpx.get(f"{api}/events", params={"limit": 1000}, timeout=5).json()
            if e["vm"] == "linux-life"
        ]
        assert "vm.shutdown" in kinds, "a graceful power-off, not a hard one"
    finally:
        kill_qemus_under(state_dir)
