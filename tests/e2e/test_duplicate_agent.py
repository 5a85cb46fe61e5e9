"""Two agents, or an agent and an impostor, fighting over one host id on a real Mosquitto.

- A second live ``fleetvisor agent`` process with an enrolled host id is refused: it exits (code 3)
  with a message that says why and what to do, an event names both runs, and the first agent keeps
  the host, its VMs and its health.
- A host whose session is knocked off the broker over and over by an impostor holding its client id
  (stolen credentials, no agent run to refuse) is held as contested: never failed, never fenced,
  and its HA VMs are not restarted elsewhere.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import paho.mqtt.client as mqtt

from controller.daemon import FleetSettings
from controller.services.ha.manager import HaSettings
from tests.support.fleet import Fleet, eventually
from tests.support.processes import start_agent, start_process_fleet, wait_for


def _events(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/api/v1/events", params={"limit": 1000}, timeout=3).json()  # type: ignore[no-any-return]


def test_a_second_live_agent_with_an_enrolled_host_id_is_refused_loudly(mosquitto, procs, tmp_path) -> None:
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1", "h2"))
    r = httpx.post(
        f"{fleet.url}/api/v1/vms",
        json={"name": "web", "memory_mib": 256, "scheduling": {"start_on": "h2"}},
        params={"wait": 20},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    copy = start_agent(procs, mosquitto.url, tmp_path / "copy", "h2", name="h2-copy")
    code = wait_for(lambda: copy.popen.poll(), 90, "the second h2 agent to be refused", [*fleet.all, copy])
    output = copy.output()
    assert code == 3, output[-3000:]
    assert "refused by the controller: another agent with host id 'h2' is live" in output, output[-3000:]
    assert "give this one its own --host-id" in output
    original = fleet.agents["h2"].popen
    assert original.poll() is None, "the first h2 agent keeps running"
    alerts = [e for e in _events(fleet.url) if e["type"] == "host.duplicate_agent"]
    assert len(alerts) == 1 and alerts[0]["host_id"] == "h2", alerts
    assert "two agents are live as host h2" in alerts[0]["message"]
    wait_for(lambda: {h["host_id"]: h["online"] for h in fleet.hosts()}["h2"], 30, "h2 online", fleet.all)
    vm = httpx.get(f"{fleet.url}/api/v1/vms/web", timeout=3).json()
    assert (vm["host_id"], vm["state"]) == ("h2", "running"), vm
    bad = [e["message"] for e in _events(fleet.url) if e["type"] in ("host.failed", "ha.fenced")]
    assert bad == [], bad


def _impostor(url: str, client_id: str, stop: threading.Event) -> None:
    """Hold ``client_id``'s session, taking it back at once whenever its owner does, until ``stop``:
    what stolen credentials can do.
    """
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    while not stop.is_set():
        knocked = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        client.on_disconnect = lambda *_, knocked=knocked: knocked.set()
        try:
            client.connect(host, int(port), keepalive=10)
        except OSError:
            time.sleep(0.05)
            continue
        held_until = time.monotonic() + 1.5
        while not knocked.is_set() and time.monotonic() < held_until:
            client.loop(timeout=0.01)
        client.disconnect()


async def test_a_host_whose_session_is_knocked_repeatedly_is_held_never_failed(mosquitto, tmp_path) -> None:
    settings = FleetSettings(ha=HaSettings(fencing="lease", lease_s=0.5, lease_margin_s=0.1))
    async with Fleet(mosquitto.url, tmp_path, fleet_settings=settings) as fleet:
        await fleet.add_agent("h1")
        await fleet.add_agent("h2")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            r = await client.post(
                "/api/v1/vms",
                json={"name": "web", "memory_mib": 256, "ha": True, "scheduling": {"start_on": "h2"}},
                params={"wait": 10},
            )
            assert r.status_code == 200, r.text
        stop = threading.Event()
        thread = threading.Thread(target=_impostor, args=(mosquitto.url, "fv-agent-h2", stop), daemon=True)
        thread.start()
        try:
            await asyncio.sleep(10.0)
        finally:
            stop.set()
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        events = fleet.ctl.store.events_since(0)
        flaps = fleet.ctl.ha.detector.contested("h2", time.monotonic())
        assert flaps >= 3, "the fight was seen: h2's session changed hands again and again"
        failed = [e.message for e in events if e.type in ("host.failed", "ha.fenced") and e.host_id == "h2"]
        assert failed == [], failed
        vm = fleet.ctl.store.vm("web")
        assert vm is not None and vm.host_id == "h2"
        await eventually(lambda: fleet.ctl.store.host("h2").online, 10, "h2 back")  # type: ignore[union-attr]
