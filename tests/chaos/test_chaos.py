"""Chaos: kill agents, the controller and the broker at random while creates, deletes, live
migrations and evacuations run.

Afterwards an invariant checker asserts that every VM exists exactly once, that the store matches what
the agents report, and that no operation is stuck (evacuations included). The run is bounded: ``FV_CHAOS_SECONDS``
(default 25) of chaos, then up to 60 s to settle. Run it longer by hand, e.g.
``FV_CHAOS_SECONDS=600 ./scripts/test tests/chaos``.

Every process is real (controller, agents, Mosquitto with persistence) and is killed with SIGKILL by
PID. Two hosts use the sim engine, whose VMs outlive the agent (its state file is the "hypervisor").
Where QEMU and the test guests are available, the third host runs real tiny guests under QEMU, and
its QEMU processes are killed too; a few VMs are pinned there so that TCG does not swamp the machine.
Migrations and evacuations run between the two sim hosts (a migration keeps its engine).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.support import free_port
from tests.support.processes import ROOT, wait_for

SECONDS = float(os.environ.get("FV_CHAOS_SECONDS", "25"))
SEED = int(os.environ.get("FV_CHAOS_SEED", str(int(time.time()))))
HOSTS = ("h1", "h2", "q1")
QEMU_VMS = 3  # at most this many live guests on the qemu host
#: A 64 MiB VM at 32 MiB/s takes about 2 s to move, so kills land in the middle of migrations.
SLOW_MIGRATION = {"policy": {"bandwidth_mib_s": 32}}


@pytest.mark.timeout(SECONDS + 180)
def test_random_kills_never_lose_or_duplicate_a_vm_and_leave_no_operation_stuck(
    mosquitto_factory, procs, tmp_path, request
):
    """Kill -9 agents, the controller and the broker at random under load; then check the invariants."""
    rng = random.Random(SEED)
    broker = mosquitto_factory(persistence=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    generation = Counter[str]()

    def start_controller() -> Any:
        generation["controller"] += 1
        return procs(
            f"controller-{generation['controller']}",
            "controller",
            "--broker",
            broker.url,
            "--db",
            str(tmp_path / "c.sqlite"),
            "--port",
            str(port),
            "--operation-timeout",
            "10",
        )

    images = tmp_path / "images"
    tiny = ROOT / ".cache" / "guests" / "tiny.elf"
    real_guests = shutil.which("qemu-system-x86_64") is not None and tiny.exists()
    if real_guests:
        from tests.support.qemu import kill_qemus_under

        request.addfinalizer(lambda: kill_qemus_under(tmp_path / "q1"))  # guests outlive agents by design
        images.mkdir()
        shutil.copy(tiny, images / "tiny.elf")
    engine_args = {"q1": ("--hv", "qemu", "--image-dir", str(images))} if real_guests else {}

    def start_agent(host: str) -> Any:
        generation[host] += 1
        return procs(
            f"{host}-{generation[host]}",
            "agent",
            "--host-id",
            host,
            "--broker",
            broker.url,
            "--state-dir",
            str(tmp_path / host),
            "--memory-mib",
            "16384",
            "--telemetry-interval",
            "0.5",
            *engine_args.get(host, ()),
        )

    running: dict[str, Any] = {"controller": start_controller(), **{h: start_agent(h) for h in HOSTS}}
    wait_for(
        lambda: len(httpx.get(f"{url}/api/v1/hosts", timeout=2).json()) == 3,
        30,
        "hosts",
        list(running.values()),
    )

    stop = threading.Event()
    log: list[str] = []
    evacuations: list[str] = []  # operation ids
    migrations: list[str] = []

    def migrate_one() -> None:
        vms = httpx.get(f"{url}/api/v1/vms", timeout=3).json()
        movable = [v for v in vms if v["host_id"] in ("h1", "h2") and v["state"] == "running"]
        if movable:
            name = rng.choice(movable)["name"]
            reply = httpx.post(f"{url}/api/v1/vms/{name}/migrate", json=SLOW_MIGRATION, timeout=3)
            if reply.status_code == 202:
                migrations.append(reply.json()["op_id"])

    def evacuate_one() -> None:
        host = rng.choice(["h1", "h2"])
        reply = httpx.post(f"{url}/api/v1/hosts/{host}/evacuate", json=SLOW_MIGRATION, timeout=3)
        if reply.status_code == 202:
            evacuations.append(reply.json()["op_id"])

    def workload() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                roll = rng.random()
                if roll < 0.55:
                    body: dict[str, Any] = {"name": f"c-{n}", "memory_mib": 64}
                    if real_guests:  # the sim hosts ignore devices; the qemu host boots the tiny guest
                        body.update(
                            boot={"kernel": str(images / "tiny.elf")}, console=False, rng=False, balloon=False
                        )
                        on_qemu = sum(
                            1
                            for v in httpx.get(f"{url}/api/v1/vms", timeout=3).json()
                            if v["host_id"] == "q1"
                        )
                        pin = (
                            {"hosts": ["q1"]}
                            if on_qemu < QEMU_VMS and rng.random() < 0.3
                            else {"avoid_hosts": ["q1"]}
                        )
                        body["scheduling"] = pin
                    httpx.post(f"{url}/api/v1/vms", json=body, timeout=3)
                elif roll < 0.8:
                    vms = httpx.get(f"{url}/api/v1/vms", timeout=3).json()
                    if vms:
                        httpx.delete(f"{url}/api/v1/vms/{rng.choice(vms)['name']}", timeout=3)
                elif roll < 0.99:
                    migrate_one()
                else:
                    evacuate_one()
            except (httpx.HTTPError, ValueError):
                pass  # the controller may be down right now; that is the point
            time.sleep(0.05)

    worker = threading.Thread(target=workload, daemon=True)
    worker.start()
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(1.0, 3.0))
            victim = rng.choice(["controller", "broker", *HOSTS, *(["qemu"] if real_guests else [])])
            log.append(f"{time.monotonic():.1f} kill {victim}")
            if victim == "qemu":
                pids = [
                    int(p.read_text().split()[0])
                    for p in (tmp_path / "q1").rglob("qemu.pid")
                    if p.read_text()
                ]
                alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
                if alive:
                    os.kill(rng.choice(alive), signal.SIGKILL)
                continue
            if victim == "broker":
                broker.restart(kill=True, down_s=rng.uniform(0.2, 1.5))
                continue
            proc = running[victim]
            os.kill(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(5)
            time.sleep(rng.uniform(0.1, 1.5))
            running[victim] = start_controller() if victim == "controller" else start_agent(victim)
    finally:
        stop.set()
        worker.join(10)

    # Settle: everyone back, every operation ended.
    def settled() -> bool:
        hosts = httpx.get(f"{url}/api/v1/hosts", timeout=3).json()
        vms = httpx.get(f"{url}/api/v1/vms", timeout=3).json()
        evacuating = [
            op_id
            for op_id in evacuations
            if httpx.get(f"{url}/api/v1/operations/{op_id}", timeout=3).json()["state"] == "running"
        ]
        return all(h["online"] for h in hosts) and all(v["operation"] is None for v in vms) and not evacuating

    context = f"seed {SEED}; chaos log: {log}"
    wait_for(settled, 60, f"the fleet to settle ({context})", list(running.values()))
    time.sleep(2.0)  # one more round of inventories

    hosts = httpx.get(f"{url}/api/v1/hosts", timeout=3).json()
    vms = {v["name"]: v for v in httpx.get(f"{url}/api/v1/vms", timeout=3).json()}
    reported: dict[str, list[tuple[str, str]]] = {}
    for host in hosts:
        for vm in host["reported_vms"]:
            reported.setdefault(vm["name"], []).append((host["host_id"], vm["state"]))

    problems = []
    for name, copies in reported.items():
        if len(copies) > 1:
            problems.append(f"{name} is on {len(copies)} hosts: {copies}")
        if name not in vms:
            problems.append(f"{name} runs on {copies} but the store does not know it")
    for name, vm in vms.items():
        if vm["state"] == "error":
            continue  # a create that failed cleanly: no host, no claim
        copies = reported.get(name, [])
        if not copies:
            problems.append(f"{name} is recorded on {vm['host_id']} ({vm['state']}) but no host reports it")
        elif copies[0][0] != vm["host_id"]:
            problems.append(f"{name} is recorded on {vm['host_id']} but runs on {copies[0][0]}")
        elif vm["state"] in ("running", "stopped", "paused", "crashed") and copies[0][1] not in (
            vm["state"],
            "defined",
        ):
            problems.append(f"{name}: store says {vm['state']}, host says {copies[0][1]}")
    ops = [e for e in httpx.get(f"{url}/api/v1/events", params={"limit": 1000}, timeout=3).json()]
    assert ops, "the workload must have produced events"
    assert migrations, f"the workload must have started migrations ({context})"
    ended = Counter(
        httpx.get(f"{url}/api/v1/operations/{op_id}", timeout=3).json()["state"] for op_id in migrations
    )
    assert ended["succeeded"] > 0, f"no migration succeeded: {ended} ({context})"
    assert problems == [], f"{context}\n" + "\n".join(problems)
    assert len(log) >= SECONDS / 3 - 1, "chaos must actually have happened"
