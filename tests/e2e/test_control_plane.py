"""Control-plane faults with real processes: the controller killed mid-operation, the broker restarted."""

from __future__ import annotations

import os
import signal
import time

import httpx

from tests.support import free_port
from tests.support.processes import start_process_fleet, wait_for


def test_controller_killed_mid_creates_resumes_every_operation_to_success(mosquitto_factory, procs, tmp_path):
    """Kill -9 the controller with 20 creates in flight; the next one finishes all 20, each VM on one host."""
    broker = mosquitto_factory(persistence=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ("controller", "--enrolment", "open",
            "--broker", broker.url, "--db", str(tmp_path / "c.sqlite"), "--port", str(port))  # fmt: skip
    fleet = start_process_fleet(procs, broker.url, tmp_path, hosts=("h1", "h2"), port=port)
    controller, agents = fleet.controller, list(fleet.agents.values())
    # Hold the agents so that every create is still in flight when the controller dies.
    for agent in agents:
        os.kill(agent.popen.pid, signal.SIGSTOP)
    try:
        for i in range(20):
            r = httpx.post(f"{url}/api/v1/vms", json={"name": f"inflight-{i}", "memory_mib": 256}, timeout=5)
            assert r.status_code == 202, r.text
        os.kill(controller.popen.pid, signal.SIGKILL)
        controller.popen.wait(5)
    finally:
        for agent in agents:
            os.kill(agent.popen.pid, signal.SIGCONT)
    controller = procs("controller-2", *args)

    def all_done() -> bool:
        vms = httpx.get(f"{url}/api/v1/vms", timeout=2).json()
        return len(vms) == 20 and all(v["state"] == "running" and v["operation"] is None for v in vms)

    wait_for(all_done, 30, "all 20 creates to finish after the restart", [controller, *agents])
    hosts = httpx.get(f"{url}/api/v1/hosts", timeout=2).json()
    wait_for(
        lambda: sum(len(h["reported_vms"]) for h in httpx.get(f"{url}/api/v1/hosts", timeout=2).json()) == 20,
        10,
        "inventories",
    )
    hosts = httpx.get(f"{url}/api/v1/hosts", timeout=2).json()
    reported = sorted(vm["name"] for h in hosts for vm in h["reported_vms"])
    assert reported == sorted(f"inflight-{i}" for i in range(20)), "each VM exactly once"
    events = httpx.get(f"{url}/api/v1/events", params={"limit": 1000}, timeout=2).json()
    assert any(e["type"] == "controller.resumed" for e in events)
    assert not any(e["type"] == "operation.failed" for e in events)


def test_broker_restart_loses_no_qos1_event(mosquitto_factory, procs, tmp_path):
    """Events an agent emits while the broker is down reach the controller after both reconnect."""
    broker = mosquitto_factory(persistence=True)
    fleet = start_process_fleet(procs, broker.url, tmp_path)
    url, controller, agent = fleet.url, fleet.controller, fleet.agents["h1"]
    for i in range(3):
        httpx.post(
            f"{url}/api/v1/vms", json={"name": f"ev-{i}", "memory_mib": 256}, params={"wait": 10}, timeout=15
        )
    # Queue stops while the broker is up, then take the broker down before the agent can answer all of them.
    os.kill(agent.popen.pid, signal.SIGSTOP)
    for i in range(3):
        r = httpx.post(f"{url}/api/v1/vms/ev-{i}/stop", json={"force": True}, timeout=5)
        assert r.status_code == 202
    time.sleep(0.3)
    broker.stop()
    os.kill(agent.popen.pid, signal.SIGCONT)  # it applies what it got and queues its events and replies
    time.sleep(1.0)
    broker.start()

    def stopped() -> bool:
        vms = httpx.get(f"{url}/api/v1/vms", timeout=2).json()
        return all(v["state"] == "stopped" and v["operation"] is None for v in vms)

    wait_for(stopped, 30, "every stop to complete across the broker restart", [controller, agent])
    events = httpx.get(f"{url}/api/v1/events", params={"limit": 1000}, timeout=2).json()
    stopped_events = {e["vm"] for e in events if e["type"] == "vm.stopped"}
    assert stopped_events == {"ev-0", "ev-1", "ev-2"}, "every agent event arrived"
