"""A whole fleet of processes on the broker `fleetvisor broker-config` writes: mqtts://, per-host users,
the API on HTTPS; a spy host's credentials read nothing of the others' traffic and forge nothing; a
killed agent's Last Will passes the ACL.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocols import codec, topics
from protocols.messages import HostState
from tests.support.processes import Proc, wait_for
from tests.support.secure_fleet import SecureBroker, SecureFleet


@pytest.fixture
def secure_fleet(mosquitto_binary: str, procs: Callable[..., Proc], tmp_path: Path) -> Iterator[SecureFleet]:
    broker = SecureBroker(["h1", "h2", "spy"])
    try:
        fleet = SecureFleet(broker, procs, tmp_path, ["h1", "h2"])
        yield fleet
        fleet.close()
    finally:
        broker.close()


def _op(fleet: SecureFleet, response: Any, what: str) -> dict[str, Any]:
    assert response.status_code in (200, 202), response.text
    body: dict[str, Any] = response.json()
    op_id = (body.get("operation") or body)["op_id"]
    return wait_for(  # type: ignore[no-any-return]
        lambda: (op := fleet.http.get(f"/operations/{op_id}").json())["state"] != "running" and op,
        30,
        what,
        fleet.all,
    )


def _run_spy(fleet: SecureFleet, seen: list[str], ready: threading.Event, stop: asyncio.Event) -> Any:
    """The spy host's credentials: subscribe to every topic of every host, and forge h2's state and a command."""

    async def spy() -> None:
        bus = fleet.broker.bus("spy", tls=True)
        for pattern in (
            "#",
            "fv/v1/host/+/#",
            *(topics.host_topic(h, f) for h in ("h1", "h2") for f in topics.FAMILIES),
        ):
            bus.subscribe(pattern, lambda t, p: seen.append(t), qos=1)
        async with bus:
            await bus.wait_connected(10)
            forged = HostState(host_id="h2", online=False, boot_id="forged", ts=time.time())
            await bus.publish(topics.host_topic("h2", "state"), codec.encode(forged), qos=1, retain=True)
            await bus.publish(topics.host_topic("h1", "cmd"), b"forged command", qos=1)
            ready.set()
            await stop.wait()

    return spy()


def test_a_fleet_over_mqtts_migrates_a_vm_the_spy_sees_nothing_and_a_kill_9_is_seen_offline(
    secure_fleet: SecureFleet,
) -> None:
    """mqtts:// with per-host users and HTTPS: create and live-migrate a VM; the spy host reads and
    forges nothing; kill -9 an agent and its Last Will marks it offline within seconds.
    """
    fleet = secure_fleet
    seen: list[str] = []
    loop = asyncio.new_event_loop()
    stop, ready = asyncio.Event(), threading.Event()
    spy = threading.Thread(
        target=loop.run_until_complete, args=(_run_spy(fleet, seen, ready, stop),), daemon=True
    )
    spy.start()
    try:
        assert ready.wait(15), "the spy host could not connect"
        created = _op(
            fleet,
            fleet.http.post(
                "/vms", json={"name": "web-1", "vcpus": 1, "memory_mib": 512}, params={"wait": 20}
            ),
            "web-1 created",
        )
        assert created["state"] == "succeeded", created
        source = fleet.http.get("/vms/web-1").json()["host_id"]
        target = "h2" if source == "h1" else "h1"
        moved = _op(fleet, fleet.http.post("/vms/web-1/migrate", json={"to": target}), "web-1 migrated")
        assert moved["state"] == "succeeded", moved
        assert fleet.http.get("/vms/web-1").json()["host_id"] == target
        assert fleet.online() == {"h1", "h2"}, "the forged offline state of h2 was not accepted"
    finally:
        loop.call_soon_threadsafe(stop.set)
        spy.join(10)
        loop.close()
    assert seen == [], f"the spy host read other hosts' topics: {sorted(set(seen))}"

    victim = fleet.agents[target].popen
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(5)
    killed = time.monotonic()
    wait_for(lambda: target not in fleet.online(), 10, f"{target} offline by its Last Will", fleet.all)
    assert time.monotonic() - killed < 10
    host = fleet.http.get(f"/hosts/{target}").json()
    assert "connection lost" in host["state_reason"]
    log = fleet.broker.log()
    listener_of = dict(re.findall(r"New connection from (\S+) on port (\d+)\.", log))
    users = re.findall(r"New client connected from (\S+) as \S+ \(.*u'([^']+)'\)", log)
    assert {user for _, user in users} == {"h1", "h2", "spy", "fv-controller", "fv-controller-telemetry"}
    assert {listener_of[peer] for peer, _ in users} == {str(fleet.broker.tls_port)}, "all over mqtts"
