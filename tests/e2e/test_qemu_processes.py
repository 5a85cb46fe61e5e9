"""End to end with real QEMU: controller, Mosquitto and a qemu agent as processes, the tiny guest as the VM.

The agent runs as ``fleetvisor agent --hv qemu --state-dir DIR`` with no other qemu option, so its
image directory is the default ``DIR/images``, where the test copies the tiny guest. Every process
(controller, agents, QEMU) is stopped by PID when the test ends.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import free_port
from tests.support.processes import Proc, wait_for
from tests.support.qemu import build_guests, counter_values, kill_qemus_under, pid_alive, qemu_skip_reason


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """``procs(name, *args)`` starts ``python -m fleetvisor *args``; all are stopped by PID after the test."""
    started: list[Proc] = []

    def start(name: str, *args: str) -> Proc:
        proc = Proc(list(args), tmp_path / f"{name}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def test_a_qemu_vm_through_the_api_survives_its_agent_being_killed(
    mosquitto: Any, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """Create the tiny guest via the API, kill -9 the agent (QEMU runs on), restart it, stop and delete."""
    reason = qemu_skip_reason()
    if reason:
        pytest.skip(reason)
    guests = build_guests()
    if isinstance(guests, str):
        pytest.skip(guests)
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
