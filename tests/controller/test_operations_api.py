"""Operations as a resource: a filtered, paged list and a cancel, through the REST API of a fleet of
in-process sim agents on a real Mosquitto.
"""

from __future__ import annotations

import httpx

from tests.support.fleet import Fleet, eventually


async def _create(client: httpx.AsyncClient, name: str, host: str, memory_mib: int = 128) -> str:
    """A running VM on ``host`` (dirtying 1 MiB/s); returns its create operation's id."""
    r = await client.post(
        "/api/v1/vms",
        json={
            "name": name,
            "memory_mib": memory_mib,
            "workload": {"dirty_mib_s": 1},
            "scheduling": {"start_on": host},
        },
        params={"wait": 10},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["operation"]["op_id"])


async def test_operations_list_filters_pages_and_refuses_bad_filters(mosquitto, tmp_path) -> None:
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        await fleet.add_agent("h2")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            for i in range(5):
                await _create(client, f"web-{i}", "h1" if i % 2 == 0 else "h2")
            r = await client.post("/api/v1/vms/web-0/stop", json={"force": True}, params={"wait": 10})
            assert r.status_code == 200, r.text
            everything = (await client.get("/api/v1/operations")).json()
            assert [op["kind"] for op in everything["operations"]] == ["stop"] + ["create"] * 5
            assert everything["next"] is None
            seen, page = [], None
            while True:  # pages of 2 walk the same list, newest first, without repeats or gaps
                params: dict[str, str | int] = {"limit": 2} | ({"page": page} if page else {})
                body = (await client.get("/api/v1/operations", params=params)).json()
                seen += [op["op_id"] for op in body["operations"]]
                page = body["next"]
                if page is None:
                    break
            assert seen == [op["op_id"] for op in everything["operations"]]
            on_h2 = (await client.get("/api/v1/operations", params={"host": "h2", "kind": "create"})).json()
            assert sorted(op["vm"] for op in on_h2["operations"]) == ["web-1", "web-3"]
            one_vm = (await client.get("/api/v1/operations", params={"vm": "web-0"})).json()
            assert [op["kind"] for op in one_vm["operations"]] == ["stop", "create"]
            later = everything["operations"][0]["created_at"]
            recent = (await client.get("/api/v1/operations", params={"since": later})).json()
            assert [op["kind"] for op in recent["operations"]] == ["stop"]
            bad = await client.get("/api/v1/operations", params={"kind": "explode"})
            assert bad.status_code == 400 and "kind 'explode' is not one of: create" in bad.text, bad.text
            bad_page = await client.get("/api/v1/operations", params={"page": "yesterday"})
            assert bad_page.status_code == 400 and bad_page.json()["error"]["detail"] == {"field": "page"}


async def test_cancel_through_operations_stops_a_migration_and_refuses_what_cannot_be_cancelled(
    mosquitto, tmp_path
) -> None:
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        await fleet.add_agent("h2")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            created = await _create(client, "slow", "h1", memory_mib=2048)
            done = await client.post(f"/api/v1/operations/{created}/cancel")
            assert done.status_code == 409 and "already succeeded" in done.text, done.text
            r = await client.post(
                "/api/v1/vms/slow/migrate", json={"to": "h2", "policy": {"bandwidth_mib_s": 100}}
            )
            op_id = r.json()["op_id"]
            await eventually(lambda: op_id in fleet.ctl.migrations.progress, 10, "progress")
            r = await client.post(f"/api/v1/operations/{op_id}/cancel", params={"wait": 20})
            assert r.status_code == 200, r.text
            op = r.json()
            assert op["state"] == "failed" and "cancelled by the operator" in op["error"], op
            missing = await client.post("/api/v1/operations/nope/cancel")
            assert missing.status_code == 404
        record = fleet.ctl.store.vm("slow")
        assert record is not None and record.host_id == "h1" and record.state == "running"
        assert {vm.name for vm in await fleet.drivers["h2"].list()} == set()


async def test_cancelling_an_evacuation_leaves_the_rest_in_place_and_every_vm_running_once(
    mosquitto, tmp_path
) -> None:
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        await fleet.add_agent("h2")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=60) as client:
            for i in range(5):
                await _create(client, f"e{i}", "h1", memory_mib=1024)
            r = await client.post("/api/v1/hosts/h1/evacuate", json={"policy": {"bandwidth_mib_s": 200}})
            op_id = r.json()["op_id"]
            await eventually(lambda: len(fleet.ctl.migrations.progress) > 0, 10, "the first wave sending")
            r = await client.post(f"/api/v1/operations/{op_id}/cancel")
            assert r.status_code == 202, r.text
            op = (await client.get(f"/api/v1/operations/{op_id}", params={"wait": 60})).json()
        assert op["state"] == "failed" and op["error"].startswith("cancelled by the operator ("), op
        results = op["params"]["results"]
        moved = sorted(n for n, r in results.items() if r.startswith("moved to h2"))
        stayed = sorted(n for n, r in results.items() if r == "cancelled: not started")
        assert moved and stayed and sorted(moved + stayed) == [f"e{i}" for i in range(5)], results
        on_h1 = {vm.name: vm.state for vm in await fleet.drivers["h1"].list()}
        on_h2 = {vm.name: vm.state for vm in await fleet.drivers["h2"].list()}
        assert on_h1 == dict.fromkeys(stayed, "running") and on_h2 == dict.fromkeys(moved, "running")
        assert {vm.name: vm.host_id for vm in fleet.ctl.store.vms()} == {
            **dict.fromkeys(stayed, "h1"),
            **dict.fromkeys(moved, "h2"),
        }
