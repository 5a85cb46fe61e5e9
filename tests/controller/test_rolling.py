"""Rolling maintenance through the controller (in-process sim agents on a real Mosquitto): the plan,
anti-affinity held throughout, VMs out and back, the operator's step (continue, failure) and an
agent that restarts in it. Real agent processes and a controller killed with -9 mid-roll are in
tests/e2e/test_rolling_maintenance.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx

import agent.daemon
from tests.support.fleet import Fleet, create_vm, eventually

HOSTS = ("h1", "h2", "h3", "h4")
GROUPS = ("g1", "g2", "g3", "g4")


async def _grouped_fleet(fleet: Fleet, client: httpx.AsyncClient) -> None:
    """Four hosts with three VMs each; anti-affinity group gN has a member on every host but hN, so
    each VM of a host in maintenance has exactly one valid target: the host its group is missing from.
    """
    for host in HOSTS:
        await fleet.add_agent(host)
    for group, missing in zip(GROUPS, HOSTS, strict=True):
        for host in HOSTS:
            if host != missing:
                body: dict[str, Any] = {
                    "name": f"{group}-{host}",
                    "memory_mib": 256,
                    "scheduling": {"start_on": host, "group": group, "group_policy": "anti-affinity"},
                }
                r = await client.post("/api/v1/vms", json=body, params={"wait": 10})
                assert r.status_code == 200, r.text


def _broken_groups(fleet: Fleet) -> list[str]:
    """Groups with two members recorded on one host (the record moves at the switch-over)."""
    seen = Counter((vm.spec.name.split("-")[0], vm.host_id) for vm in fleet.ctl.store.vms())
    return [f"{group} twice on {host}" for (group, host), n in seen.items() if n > 1]


async def _watch(fleet: Fleet, broken: list[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        broken.extend(_broken_groups(fleet))
        await asyncio.sleep(0.01)


async def test_a_roll_over_four_hosts_keeps_every_group_apart_and_moves_each_vm_out_and_back(
    mosquitto, tmp_path
) -> None:
    async with (
        Fleet(mosquitto.url, tmp_path) as fleet,
        httpx.AsyncClient(base_url=fleet.api_url, timeout=60) as client,
    ):
        await _grouped_fleet(fleet, client)
        homes = {vm.name: vm.host_id for vm in fleet.ctl.store.vms()}
        broken: list[str] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(fleet, broken, stop))
        body = {"selector": "", "return_vms": True, "step": "none"}
        r = await client.post("/api/v1/rolling-maintenance", json=body, params={"wait": 120})
        stop.set()
        await watcher
        op = r.json()
        assert op["state"] == "succeeded", op
        assert broken == [], broken
        progress = op["params"]["progress"]
        assert [progress[h]["phase"] for h in HOSTS] == ["done"] * 4, progress
        # The only valid target of gN's member on a host in maintenance is hN: the plan found it.
        for host in HOSTS:
            assert progress[host]["plan"] == {
                f"{g}-{host}": m for g, m in zip(GROUPS, HOSTS, strict=True) if m != host
            }, progress[host]
        moves = Counter(
            c["vm"]
            for c in (await client.get("/api/v1/operations", params={"parent": op["op_id"]})).json()[
                "operations"
            ]
            if c["kind"] == "migrate" and c["state"] == "succeeded"
        )
        assert moves == {vm: 2 for vm in homes}, moves  # out and back, each once
        assert {vm.name: vm.host_id for vm in fleet.ctl.store.vms()} == homes
        for host in HOSTS:
            assert {v.name for v in await fleet.drivers[host].list()} == {
                vm for vm, home in homes.items() if home == host
            }
            assert not fleet.ctl.store.host(host).maintenance  # type: ignore[union-attr]


async def test_a_failed_step_stops_the_roll_and_leaves_its_host_in_maintenance(mosquitto, tmp_path) -> None:
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("h1", "h2", "h3"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=60) as client:
            for host in ("h1", "h2"):
                await create_vm(client, f"vm-{host}", host, {})
            r = await client.post(
                "/api/v1/rolling-maintenance", json={"selector": "name in (h1,h2)", "dry_run": True}
            )
            assert r.json() == {"selector": "name in (h1,h2)", "waves": [["h1"], ["h2"]]}, r.text
            op = (
                await client.post("/api/v1/rolling-maintenance", json={"selector": "name in (h1,h2)"})
            ).json()
            op_id = op["op_id"]

            async def phase(host: str) -> str:
                got = (await client.get(f"/api/v1/operations/{op_id}")).json()
                return str(got["params"]["progress"][host]["phase"])

            r = await client.post(f"/api/v1/operations/{op_id}/continue", json={"host": "h2"})
            assert r.status_code == 409 and "not waiting for its step" in r.text, r.text
            deadline = asyncio.get_running_loop().time() + 30
            while await phase("h1") != "step":
                assert asyncio.get_running_loop().time() < deadline, await phase("h1")
                await asyncio.sleep(0.05)
            assert fleet.ctl.store.host("h1").maintenance  # type: ignore[union-attr]
            assert [v.name for v in await fleet.drivers["h1"].list()] == []
            body = {"host": "h1", "ok": False, "message": "firmware update exited 2"}
            r = await client.post(f"/api/v1/operations/{op_id}/continue", json=body)
            assert (
                r.status_code in (200, 202) and r.json()["params"]["progress"]["h1"]["phase"] == "failed"
            ), r.text
            done = (await client.get(f"/api/v1/operations/{op_id}", params={"wait": 30})).json()
            assert done["state"] == "failed", done
            assert "firmware update exited 2" in done["error"] and "h2: skipped" in done["error"], done
            assert fleet.ctl.store.host("h1").maintenance  # type: ignore[union-attr]
            assert not fleet.ctl.store.host("h2").maintenance  # type: ignore[union-attr]
            assert [v.name for v in await fleet.drivers["h2"].list()] == ["vm-h2"]  # untouched


async def test_the_roll_waits_for_an_agent_restarted_in_its_step_and_reports_its_new_version(
    mosquitto, tmp_path, monkeypatch
) -> None:
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        await fleet.add_agent("h2")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=60) as client:
            await create_vm(client, "web", "h1", {})
            op = (await client.post("/api/v1/rolling-maintenance", json={"selector": "name=h1"})).json()
            op_id = op["op_id"]
            await eventually(
                lambda: fleet.ctl.store.operation(op_id).params["progress"]["h1"]["phase"] == "step",  # type: ignore[union-attr]
                30,
                "h1 waits for its step",
            )
            assert fleet.ctl.store.vm("web").host_id == "h2"  # type: ignore[union-attr]
            await fleet.stop_agent("h1")  # the operator's step: an upgrade restarts the agent
            await eventually(lambda: not fleet.ctl.store.host("h1").online, 10, "h1 offline")  # type: ignore[union-attr]
            r = await client.post(
                f"/api/v1/operations/{op_id}/continue", json={"host": "h1", "message": "upgraded"}
            )
            assert r.status_code == 202, r.text
            await asyncio.sleep(1.0)
            assert fleet.ctl.store.operation(op_id).params["progress"]["h1"]["phase"] == "agent"  # type: ignore[union-attr]
            assert fleet.ctl.store.host("h1").maintenance  # type: ignore[union-attr]  # still: no agent yet
            monkeypatch.setattr(agent.daemon, "AGENT_VERSION", "99.0.0")  # the upgraded agent
            await fleet.add_agent("h1", wait=False)
            done = (await client.get(f"/api/v1/operations/{op_id}", params={"wait": 30})).json()
            assert done["state"] == "succeeded", done
            assert not fleet.ctl.store.host("h1").maintenance  # type: ignore[union-attr]
            kinds = [e.type for e in fleet.ctl.store.events_since(0)]
            assert "rolling.step" in kinds and kinds.count("rolling.host") >= 2, kinds
            (upgrade,) = [
                e.message for e in fleet.ctl.store.events_since(0) if e.type == "rolling.agent_version"
            ]
            assert upgrade.endswith("-> 99.0.0"), upgrade
            assert done["params"]["progress"]["h1"]["agent_version_after"] == "99.0.0"


async def test_a_wave_whose_vms_cannot_all_be_placed_moves_nothing_and_says_why_once(
    mosquitto, tmp_path
) -> None:
    """Two hosts, an anti-affinity pair on them: h1's member has nowhere to go. The roll fails before
    any move, names the group once, and h1 is back out of maintenance: the refusal changed nothing.
    """
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        await fleet.add_agent("h2")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=60) as client:
            for host in ("h1", "h2"):
                body = {"name": f"db-{host}", "memory_mib": 256,
                        "scheduling": {"start_on": host, "group": "db", "group_policy": "anti-affinity"}}  # fmt: skip
                assert (await client.post("/api/v1/vms", json=body, params={"wait": 10})).status_code == 200
            await create_vm(client, "web", "h1", {})
            r = await client.post(
                "/api/v1/rolling-maintenance", json={"selector": "name=h1"}, params={"wait": 30}
            )
            op = r.json()
            assert op["state"] == "failed", op
            assert "cannot all be placed" in op["error"] and "anti-affinity" in op["error"], op["error"]
            assert op["error"].count("db-h1") <= 1, op["error"]
            assert not fleet.ctl.store.host("h1").maintenance  # type: ignore[union-attr]
            assert {v.name for v in await fleet.drivers["h1"].list()} == {"db-h1", "web"}  # nothing moved
            children = (await client.get("/api/v1/operations", params={"parent": op["op_id"]})).json()
            assert children["operations"] == []
