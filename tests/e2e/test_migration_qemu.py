"""Live migration end to end on real QEMU guests: Mosquitto, a controller and two qemu agents, as processes.

Each test migrates the tiny guest (it prints ``count=N`` every second on its serial port) between two
agent processes and checks the invariant that matters: afterwards the VM runs on exactly one host, the
store agrees, and the guest kept counting. The faults of the migration issue each get a test: the
destination QEMU killed, the destination agent killed, the controller killed, the source agent
restarted, and the network between the hosts dropped (in network namespaces).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import free_port
from tests.support.brokers import MosquittoBroker
from tests.support.needs import missing
from tests.support.processes import Proc, start_process_fleet, wait_for
from tests.support.qemu import counter_values, kill_qemus_under, require_guests

pytestmark = pytest.mark.timeout(180)

#: A guest that has dirtied 4 MiB/s for 4 s, sent over an 8 MiB/s link: its pre-copy takes a few
#: seconds, long enough to break something in the middle, and then converges. A guest that dirties
#: nothing migrates in a blink: QEMU sends untouched pages as markers.
SLOW = {"bandwidth_mib_s": 8}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A private image directory holding the tiny guest (skips without QEMU or the guest; fails under CI)."""
    tiny = require_guests().tiny
    d = tmp_path / "images"
    d.mkdir()
    shutil.copy(tiny, d / "tiny.elf")
    return d


def _agent_args(images: Path) -> tuple[str, ...]:
    return ("--hv", "qemu", "--image-dir", str(images), "--telemetry-interval", "0.5")


def _fleet(procs: Any, broker: Any, tmp_path: Path, images: Path, *controller_args: str) -> Any:
    fleet = start_process_fleet(
        procs, broker.url, tmp_path, hosts=("h1", "h2"), agent_args=_agent_args(images),
        controller_args=("--operation-timeout", "30", *controller_args),
    )  # fmt: skip
    return fleet


@pytest.fixture(autouse=True)
def _kill_guests(tmp_path: Path) -> Any:
    yield
    for host in ("h1", "h2"):
        kill_qemus_under(tmp_path / host)  # guests outlive agents by design; the test stops them


def _create(url: str, images: Path, name: str = "mover", memory: int = 128, dirty: int = 0) -> dict[str, Any]:
    body = {
        "name": name,
        "memory_mib": memory,
        "machine": "microvm",
        "boot": {"kernel": str(images / "tiny.elf"), "cmdline": f"dirty_mib_s={dirty}"},
        "console": False,
        "rng": False,
        "balloon": False,
        "scheduling": {"start_on": "h1"},
    }
    r = httpx.post(f"{url}/api/v1/vms", json=body, params={"wait": 30}, timeout=40)
    assert r.status_code == 200, r.text
    return dict(r.json()["vm"])


def _create_dirty(fleet: Any, tmp_path: Path, images: Path) -> None:
    """The guest of the fault tests: 64 MiB, dirtying 4 MiB/s, created on h1 and left to run 4 s."""
    _create(fleet.url, images, memory=64, dirty=4)
    wait_for(lambda: len(_counts(tmp_path / "h1", "mover")) >= 4, 30, "4 s of dirtying on h1", fleet.all)


def _serial(state_dir: Path, name: str) -> str:
    for path in state_dir.rglob("serial.log"):
        if name in path.parts:
            return path.read_text(errors="replace")
    return ""


def _counts(state_dir: Path, name: str) -> list[int]:
    return counter_values(_serial(state_dir, name))


def _migrate(
    url: str, name: str, to: str, policy: dict[str, Any] | None = None, wait: float = 0
) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/api/v1/vms/{name}/migrate",
        json={"to": to, "policy": policy or {}},
        params={"wait": wait},
        timeout=wait + 10,
    )
    assert r.status_code in (200, 202), r.text
    return dict(r.json())


def _op(url: str, op_id: str, wait: float = 0) -> dict[str, Any]:
    return dict(
        httpx.get(f"{url}/api/v1/operations/{op_id}", params={"wait": wait}, timeout=wait + 10).json()
    )


def _running_copies(url: str, name: str) -> list[tuple[str, str]]:
    hosts = httpx.get(f"{url}/api/v1/hosts", timeout=5).json()
    return [(h["host_id"], v["state"]) for h in hosts for v in h["reported_vms"] if v["name"] == name]


def _settled_on(url: str, name: str, host: str) -> bool:
    vm = httpx.get(f"{url}/api/v1/vms/{name}", timeout=5).json()
    return (
        vm["host_id"] == host
        and vm["state"] == "running"
        and vm["operation"] is None
        and _running_copies(url, name) == [(host, "running")]
    )


def _wait_sending(url: str, op_id: str, fleet: Any) -> None:
    wait_for(lambda: _op(url, op_id).get("progress") is not None, 30, "migration progress", fleet.all)


# -- the happy path -----------------------------------------------------------------------------------


def test_migrate_moves_a_running_guest_between_agent_processes_and_it_keeps_counting(
    mosquitto, procs, tmp_path, images
):
    """API migrate h1 -> h2: the guest's counter goes on from where it was; one copy runs; the record says h2."""
    fleet = _fleet(procs, mosquitto, tmp_path, images)
    _create(fleet.url, images)
    wait_for(lambda: len(_counts(tmp_path / "h1", "mover")) >= 2, 20, "the guest counting on h1", fleet.all)
    before = _counts(tmp_path / "h1", "mover")[-1]  # the source's files go with its copy
    op = _migrate(fleet.url, "mover", "h2", wait=60)
    assert op["state"] == "succeeded", op
    wait_for(lambda: len(_counts(tmp_path / "h2", "mover")) >= 2, 20, "the guest counting on h2", fleet.all)
    after = _counts(tmp_path / "h2", "mover")
    assert after[0] >= before and after == sorted(after), (before, after)  # it continued, it did not reboot
    assert "READY" not in _serial(tmp_path / "h2", "mover")
    wait_for(lambda: _settled_on(fleet.url, "mover", "h2"), 20, "one copy on h2", fleet.all)
    result = op["params"]["result"]
    # QEMU reports whole milliseconds: a guest that dirties nothing stops for less than one.
    assert result["status"] == "completed" and 0 <= result["downtime_ms"] <= 300 and result["total_ms"] > 0


def test_the_linux_guest_migrates_between_agent_processes_and_keeps_counting(
    mosquitto, procs, tmp_path, images
):
    """Debian's kernel with the busybox initramfs: after the move its counter goes on on h2, one copy runs."""
    from tests.support.qemu import linux_cmdline

    guests = require_guests(linux=True)
    assert guests.linux_kernel is not None and guests.linux_initrd is not None
    for path in (guests.linux_kernel, guests.linux_initrd):
        shutil.copy(path, images / path.name)
    fleet = _fleet(procs, mosquitto, tmp_path, images)
    body = {
        "name": "tux",
        "memory_mib": 256,
        "machine": "microvm",
        "boot": {
            "kernel": str(images / guests.linux_kernel.name),
            "initrd": str(images / guests.linux_initrd.name),
            "cmdline": linux_cmdline("microvm"),
        },
        "scheduling": {"start_on": "h1"},
    }
    r = httpx.post(f"{fleet.url}/api/v1/vms", json=body, params={"wait": 60}, timeout=70)
    assert r.status_code == 200, r.text
    wait_for(
        lambda: len(_counts(tmp_path / "h1", "tux")) >= 2, 60, "the Linux guest counting on h1", fleet.all
    )
    before = _counts(tmp_path / "h1", "tux")[-1]
    op = _migrate(fleet.url, "tux", "h2", wait=90)
    assert op["state"] == "succeeded", op
    wait_for(
        lambda: len(_counts(tmp_path / "h2", "tux")) >= 2, 30, "the Linux guest counting on h2", fleet.all
    )
    after = _counts(tmp_path / "h2", "tux")
    assert after[0] >= before and after == sorted(after), (before, after)
    assert "READY" not in _serial(tmp_path / "h2", "tux"), "it moved; it did not boot again"
    wait_for(lambda: _settled_on(fleet.url, "tux", "h2"), 20, "one copy on h2", fleet.all)


# -- faults ------------------------------------------------------------------------------------------


def test_destination_qemu_killed_mid_migration_leaves_the_vm_running_on_its_source(
    mosquitto, procs, tmp_path, images
):
    """Kill -9 the incoming QEMU during the send: the op fails, the guest counts on h1, h2 holds nothing."""
    fleet = _fleet(procs, mosquitto, tmp_path, images)
    _create_dirty(fleet, tmp_path, images)
    op = _migrate(fleet.url, "mover", "h2", SLOW)
    _wait_sending(fleet.url, op["op_id"], fleet)
    assert kill_qemus_under(tmp_path / "h2"), "no incoming QEMU on h2"
    done = _op(fleet.url, op["op_id"], wait=60)
    assert done["state"] == "failed", done
    wait_for(lambda: _settled_on(fleet.url, "mover", "h1"), 30, "the VM settled on h1", fleet.all)
    counted = len(_counts(tmp_path / "h1", "mover"))
    wait_for(
        lambda: len(_counts(tmp_path / "h1", "mover")) > counted, 10, "h1's guest still counting", fleet.all
    )


def test_destination_agent_killed_mid_migration_still_ends_with_one_running_copy(
    mosquitto, procs, tmp_path, images
):
    """Kill -9 h2's agent during the send, start it again: the VM runs once (on h2), the store agrees."""
    fleet = _fleet(procs, mosquitto, tmp_path, images)
    _create_dirty(fleet, tmp_path, images)
    op = _migrate(fleet.url, "mover", "h2", SLOW)
    _wait_sending(fleet.url, op["op_id"], fleet)
    agent = fleet.agents["h2"]
    os.kill(agent.popen.pid, signal.SIGKILL)
    agent.popen.wait(5)
    time.sleep(1.0)
    fleet.agents["h2"] = _restart_agent(procs, mosquitto, tmp_path, images, "h2")
    done = _op(fleet.url, op["op_id"], wait=90)
    host = "h2" if done["state"] == "succeeded" else "h1"
    wait_for(
        lambda: _settled_on(fleet.url, "mover", host),
        30,
        f"one copy on {host}",
        [*fleet.all, fleet.agents["h2"]],
    )
    assert done["state"] == "succeeded", done  # QEMU outlives its agent, so the stream completes


def test_controller_killed_mid_migration_is_resumed_by_the_next_one(mosquitto, procs, tmp_path, images):
    """Kill -9 the controller during the send and start another on the same store: the migration ends on h2."""
    fleet = _fleet(procs, mosquitto, tmp_path, images)
    _create_dirty(fleet, tmp_path, images)
    op = _migrate(fleet.url, "mover", "h2", SLOW)
    _wait_sending(fleet.url, op["op_id"], fleet)
    os.kill(fleet.controller.popen.pid, signal.SIGKILL)
    fleet.controller.popen.wait(5)
    port = fleet.url.rsplit(":", 1)[1]
    controller = procs("controller-2", "controller", "--enrolment", "open",
                       "--broker", mosquitto.url, "--db", str(tmp_path / "c.sqlite"),
                       "--port", port, "--operation-timeout", "30")  # fmt: skip
    wait_for(
        lambda: _op(fleet.url, op["op_id"])["state"] != "running", 90, "the resumed migration", [controller]
    )
    assert _op(fleet.url, op["op_id"])["state"] == "succeeded"
    wait_for(lambda: _settled_on(fleet.url, "mover", "h2"), 30, "one copy on h2", [controller])


def test_source_agent_restarted_mid_migration_reattaches_and_completes(mosquitto, procs, tmp_path, images):
    """Restart h1's agent during the send: QEMU keeps sending, the new agent attaches, the VM ends on h2."""
    fleet = _fleet(procs, mosquitto, tmp_path, images)
    _create_dirty(fleet, tmp_path, images)
    op = _migrate(fleet.url, "mover", "h2", SLOW)
    _wait_sending(fleet.url, op["op_id"], fleet)
    fleet.agents["h1"].stop()  # SIGTERM: a clean agent restart; its VMs keep running
    fleet.agents["h1"] = _restart_agent(procs, mosquitto, tmp_path, images, "h1")
    done = _op(fleet.url, op["op_id"], wait=90)
    assert done["state"] == "succeeded", done
    wait_for(lambda: _settled_on(fleet.url, "mover", "h2"), 30, "one copy on h2", fleet.all)


def _restart_agent(procs: Any, broker: Any, tmp_path: Path, images: Path, host: str, url: str = "") -> Proc:
    return procs(f"{host}-again-{time.monotonic_ns()}", "agent", "--host-id", host, "--broker", url or broker.url,
                 "--state-dir", str(tmp_path / host), *_agent_args(images))  # fmt: skip


# -- the network between the hosts drops (network namespaces) -------------------------------------


def _netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs ./scripts/test as root)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing; apt-get install -y iproute2"
    return None


class _Namespace:
    """Namespace ``fvtN`` with two veth links to the root namespace: management (broker) and data."""

    def __init__(self) -> None:
        self.name = f"fvt{os.getpid() % 10000}"
        self.sub = f"{(os.getpid() % 200) + 20}"
        self.mgmt_root, self.mgmt_ns = f"10.{self.sub}.1.1", f"10.{self.sub}.1.2"
        self.data_root, self.data_ns = f"10.{self.sub}.2.1", f"10.{self.sub}.2.2"
        self.links = (f"{self.name}m0", f"{self.name}m1", f"{self.name}d0", f"{self.name}d1")

    def _ip(self, *args: str, ns: bool = False) -> None:
        cmd = ["ip", *(("netns", "exec", self.name, "ip") if ns else ()), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def create(self) -> None:
        m0, m1, d0, d1 = self.links
        self._ip("netns", "add", self.name)
        self._ip("link", "set", "lo", "up", ns=True)
        for root_end, ns_end, root_ip, ns_ip in (
            (m0, m1, self.mgmt_root, self.mgmt_ns),
            (d0, d1, self.data_root, self.data_ns),
        ):
            self._ip("link", "add", root_end, "type", "veth", "peer", "name", ns_end)
            self._ip("link", "set", ns_end, "netns", self.name)
            self._ip("addr", "add", f"{root_ip}/24", "dev", root_end)
            self._ip("link", "set", root_end, "up")
            self._ip("addr", "add", f"{ns_ip}/24", "dev", ns_end, ns=True)
            self._ip("link", "set", ns_end, "up", ns=True)

    def drop_data_link(self) -> None:
        self._ip("link", "set", self.links[3], "down", ns=True)

    def destroy(self) -> None:
        for link in (self.links[0], self.links[2]):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


def test_network_between_the_hosts_drops_mid_migration_and_the_vm_stays_on_its_source(
    procs, tmp_path, images
):
    """h2 in its own namespace; its data link goes down mid-send: the stall detector aborts, the VM runs on h1."""
    reason = _netns_skip_reason()
    if reason is not None:
        missing(reason)
    ns = _Namespace()
    ns.destroy()
    try:
        ns.create()
    except subprocess.CalledProcessError as exc:
        ns.destroy()
        missing(f"cannot create network namespaces here: {exc.stderr.decode(errors='replace').strip()}")
    ns_port = free_port()
    broker = MosquittoBroker(
        tmp_path / "mosquitto", free_port(), extra_config=f"listener {ns_port} {ns.mgmt_root}"
    )
    try:
        broker.start()
        ns_broker = f"mqtt://{ns.mgmt_root}:{ns_port}"
        fleet = start_process_fleet(
            procs, broker.url, tmp_path, hosts=("h1",), agent_args=(*_agent_args(images), "--address", ns.data_root),
            controller_args=("--operation-timeout", "30"),
        )  # fmt: skip
        h2 = procs("h2", "agent", "--host-id", "h2", "--broker", ns_broker, "--state-dir", str(tmp_path / "h2"),
                   "--address", ns.data_ns, *_agent_args(images), prefix=("ip", "netns", "exec", ns.name))  # fmt: skip
        wait_for(
            lambda: {h["host_id"] for h in fleet.hosts() if h["online"]} == {"h1", "h2"},
            30,
            "h2 online",
            [*fleet.all, h2],
        )
        _create_dirty(fleet, tmp_path, images)
        op = _migrate(fleet.url, "mover", "h2", {**SLOW, "no_progress_s": 3})
        _wait_sending(fleet.url, op["op_id"], fleet)
        ns.drop_data_link()
        done = _op(fleet.url, op["op_id"], wait=60)
        assert done["state"] == "failed", done
        assert "no data moved" in done["error"], done["error"]
        wait_for(lambda: _settled_on(fleet.url, "mover", "h1"), 30, "the VM on h1 only", [*fleet.all, h2])
        counted = len(_counts(tmp_path / "h1", "mover"))
        wait_for(
            lambda: len(_counts(tmp_path / "h1", "mover")) > counted,
            10,
            "h1's guest still counting",
            fleet.all,
        )
    finally:
        broker.stop()
        kill_qemus_under(tmp_path / "h2")
        ns.destroy()
