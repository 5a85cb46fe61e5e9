"""Placement rules kept for a VM's life: the operator's sequence that used to break them, on a real
controller with sim agents over a real Mosquitto, through the REST API.

Each test repeats what a new operator tried (anti-affinity members piled on one host after an
evacuation and a maintenance; ``--to`` into that state; a required label and a pin ignored by later
moves; a group that changed policy) and asserts that the group, the label and the pin hold.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.fleet import Fleet


async def _create(client: httpx.AsyncClient, name: str, **scheduling: Any) -> dict[str, Any]:
    body = {"name": name, "memory_mib": 256, "scheduling": scheduling}
    r = await client.post("/api/v1/vms", json=body, params={"wait": 10})
    assert r.status_code == 200, r.text
    return dict(r.json()["vm"])


async def _placement(client: httpx.AsyncClient) -> dict[str, str]:
    return {v["name"]: v["host_id"] for v in (await client.get("/api/v1/vms")).json()}


async def _evacuate(client: httpx.AsyncClient, host: str) -> dict[str, Any]:
    r = await client.post(f"/api/v1/hosts/{host}/evacuate", params={"wait": 30})
    assert r.status_code in (200, 202), r.text
    return dict(r.json())


async def test_anti_affinity_holds_through_evacuation_maintenance_and_an_explicit_target(mosquitto, tmp_path):
    """Three anti-affinity members on three hosts: evacuate, maintenance and --to never stack two."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("host-1", "host-2", "host-3"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            for i in (1, 2, 3):
                await _create(client, f"app-{i}", group="app", group_policy="anti-affinity")
            before = await _placement(client)
            assert len(set(before.values())) == 3, before

            evacuation = await _evacuate(client, before["app-2"])
            assert evacuation["state"] == "failed" and "app-2" in evacuation["error"], evacuation
            r = await client.patch(f"/api/v1/hosts/{before['app-3']}", json={"maintenance": True})
            assert r.status_code == 200
            maintenance = await _evacuate(client, before["app-3"])
            assert maintenance["state"] == "failed" and "app-3" in maintenance["error"], maintenance

            r = await client.post("/api/v1/vms/app-3/migrate", json={"to": before["app-1"]})
            assert r.status_code == 409, r.text
            assert "anti-affinity" in r.json()["error"]["message"]
            after = await _placement(client)
            assert after == before, (
                "every member stayed where it could not be moved without breaking the group"
            )
            events = [e["type"] for e in (await client.get("/api/v1/events", params={"limit": 1000})).json()]
            assert "vm.migrated" not in events


async def test_force_with_a_reason_overrides_the_rules_and_is_recorded(mosquitto, tmp_path):
    """--force without a reason is refused; with one the move happens and an event records the reason."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("h1", "h2"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            first = await _create(client, "db-1", group="db")
            second = await _create(client, "db-2", group="db")
            assert first["host_id"] != second["host_id"]
            r = await client.post("/api/v1/vms/db-2/migrate", json={"to": first["host_id"], "force": True})
            assert r.status_code == 400 and "--reason" in r.json()["error"]["message"], r.text
            r = await client.post(
                "/api/v1/vms/db-2/migrate",
                json={"to": first["host_id"], "force": True, "reason": "h2 firmware update"},
                params={"wait": 30},
            )
            assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
            assert (await _placement(client))["db-2"] == first["host_id"]
            forced = [
                e
                for e in (await client.get("/api/v1/events", params={"limit": 1000})).json()
                if e["type"] == "vm.migrate.forced"
            ]
            assert len(forced) == 1 and "h2 firmware update" in forced[0]["message"]


async def test_a_required_label_and_a_pin_hold_through_maintenance_and_migrate(mosquitto, tmp_path):
    """--require ssd=true on the only ssd host and --host pins: maintenance and migrate keep them put."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("host-1", "host-2", "host-3", "host-4"):
            await fleet.add_agent(host)
        fleet.ctl.hosts.update("host-1", labels={"ssd": "true"})
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            fast = await _create(client, "fast-1", require={"ssd": "true"})
            pinned = await _create(client, "pinned-1", hosts=["host-4"])
            free = await _create(client, "free-1", start_on="host-4")
            assert (fast["host_id"], pinned["host_id"], free["host_id"]) == ("host-1", "host-4", "host-4")

            await client.patch("/api/v1/hosts/host-1", json={"maintenance": True})
            report = await _evacuate(client, "host-1")
            assert report["state"] == "failed" and "fast-1" in report["error"], report
            r = await client.post("/api/v1/vms/pinned-1/migrate", json={"to": "host-2"})
            assert r.status_code == 409 and "pinned to host-4" in r.json()["error"]["message"], r.text

            # start_on is not kept: the evacuation moves free-1 and leaves the pinned VM, and says so.
            report = await _evacuate(client, "host-4")
            placement = await _placement(client)
            assert placement["fast-1"] == "host-1" and placement["pinned-1"] == "host-4"
            assert placement["free-1"] not in ("host-4", None), placement
            assert report["state"] == "failed" and "pinned-1" in report["error"], report


async def test_the_power_plan_never_proposes_a_move_that_breaks_a_pin(mosquitto, tmp_path):
    """A lone light VM pinned to its host is never in the plan (nor moved by apply), with a note why."""
    from controller.daemon import FleetSettings
    from controller.services.power import PowerSettings
    from tests.controller.test_power_manager import FAST, SIM
    from tests.support.power import AgentPower

    fleet = Fleet(mosquitto.url, tmp_path)
    power = {h: AgentPower(fleet, h, sim=SIM) for h in ("h1", "h2")}
    fleet.fleet_settings = FleetSettings(power=PowerSettings(drivers=power, **{**FAST, "spare_hosts": 0}))
    async with fleet:
        for host in ("h1", "h2"):
            await fleet.add_agent(host, **SIM)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            light = {"workload": {"cpu_util": 0.1, "dirty_mib_s": 2.0}, "memory_mib": 512}
            placed = (
                ("pinned-1", {"hosts": ["h2"]}),
                ("other-1", {"start_on": "h1"}),
                ("other-2", {"start_on": "h1"}),
            )
            for name, scheduling in placed:
                r = await client.post(
                    "/api/v1/vms", json={"name": name, **light, "scheduling": scheduling}, params={"wait": 10}
                )
                assert r.status_code == 200, r.text
            await fleet_rounds(fleet)
            plan = (await client.get("/api/v1/plan")).json()
            # h2 holds only the pinned VM, so consolidating would empty h2: the plan must say why it does not.
            assert all(m["vm"] != "pinned-1" for m in plan["moves"]), plan
            assert any("pinned-1" in note and "pinned to h2" in note for note in plan["notes"]), plan
            assert all(a["host_id"] != "h2" for a in plan["power"]), plan
            outcome = (await client.post("/api/v1/plan/apply")).json()
            assert all(r.get("vm") != "pinned-1" or not r["ok"] for r in outcome["results"]), outcome
            assert (await _placement(client))["pinned-1"] == "h2"
        fleet.ctl.power.set_mode("manual")
        await fleet.ctl.power.settle()


async def fleet_rounds(fleet: Fleet, rounds: int = 4) -> None:
    """Let the power service observe a few rounds of telemetry (it plans from measured load)."""
    import asyncio

    for _ in range(rounds):
        await fleet.ctl.power.tick()
        await asyncio.sleep(0.3)


async def test_a_group_keeps_the_policy_it_was_created_with(mosquitto, tmp_path):
    """A group created as affinity refuses a later member that asks for anti-affinity, with the fix."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("h1", "h2"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            await _create(client, "cache-1", group="cache", group_policy="affinity")
            r = await client.post(
                "/api/v1/vms",
                json={
                    "name": "cache-2",
                    "memory_mib": 256,
                    "scheduling": {"group": "cache", "group_policy": "anti-affinity"},
                },
            )
            assert r.status_code == 409, r.text
            message = r.json()["error"]["message"]
            assert "cache" in message and "affinity" in message and "fixed" in message
            assert fleet.ctl.store.vm("cache-2") is None, "nothing is created"
            joined = await _create(client, "cache-3", group="cache")
            assert joined["host_id"] == (await _placement(client))["cache-1"], "it joins as affinity"
