"""A host whose session is knocked off a real Mosquitto over and over (a second agent with its host
id connecting again and again) is never failed, so never fenced, and its HA VMs are not restarted
elsewhere: the failure detector holds it as contested.
"""

from __future__ import annotations

import asyncio

import httpx

from agent.daemon import Agent, AgentSettings
from controller.daemon import FleetSettings
from controller.services.ha.manager import HaSettings
from hv.sim.driver import SimDriver
from tests.support.fleet import FAST_BUS, Fleet, eventually


async def test_a_host_whose_session_is_knocked_repeatedly_is_never_failed(mosquitto, tmp_path) -> None:
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
        for round_ in range(8):  # the impostor takes the session (same client id), then lets go
            impostor = Agent(
                AgentSettings(
                    host_id="h2", broker_url=mosquitto.url, state_dir=tmp_path / f"impostor{round_}",
                    telemetry_interval_s=0.2, bus_overrides=FAST_BUS,
                ),
                SimDriver(host_id="h2", state_dir=tmp_path / f"impostor{round_}"),
            )  # fmt: skip
            await impostor.__aenter__()
            await asyncio.sleep(0.6)
            await impostor.shutdown()
            await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)
        events = fleet.ctl.store.events_since(0)
        failed = [e.message for e in events if e.type in ("host.failed", "ha.fenced") and e.host_id == "h2"]
        assert failed == [], failed
        vm = fleet.ctl.store.vm("web")
        assert vm is not None and vm.host_id == "h2"
        await eventually(lambda: fleet.ctl.store.host("h2").online, 10, "h2 back")  # type: ignore[union-attr]
