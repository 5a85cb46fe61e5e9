"""Bulk actions through the controller (in-process sim agents on a real Mosquitto): refusals,
stop_after, host maintenance and the per-target report. The process-level tests (200 VMs, kill -9,
cancel half-way) are in tests/e2e/test_bulk_actions.py.
"""

from __future__ import annotations

import asyncio
import sys

import httpx

from tests.support.fleet import Fleet, create_vm
from tests.support.processes import ROOT


async def test_bad_bulk_requests_are_refused_and_start_nothing(mosquitto, tmp_path) -> None:
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            await create_vm(client, "a", "h1", {"tier": "web"})
            for body, code, words in (
                ({"action": "explode", "selector": "tier=web"}, "invalid_action", "not one of: start"),
                ({"action": "stop", "selector": "tier=db"}, "nothing_selected", "picks no VMs"),
                ({"action": "stop", "selector": "tier=="}, "invalid_selector", "at character 7"),
                ({"action": "maintenance", "selector": "group=x"}, "invalid_selector", "hosts have no field"),
            ):
                r = await client.post("/api/v1/actions", json=body)
                assert r.status_code == 400, r.text
                assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"], r.text
            r = await client.post("/api/v1/actions", json={"action": "stop", "max_parallel": 0})
            assert r.status_code == 400, r.text
            ops = (await client.get("/api/v1/operations", params={"kind": "bulk"})).json()["operations"]
            assert ops == [] and (await client.get("/api/v1/vms/a")).json()["state"] == "running"


async def test_already_done_targets_count_as_done_and_stop_after_skips_the_rest(mosquitto, tmp_path) -> None:
    """A pause of VMs already paused is done, not failed. A resume of running VMs fails for each;
    with stop_after 2 and one at a time, the second failure ends the action: the rest are skipped,
    and the report names the failures.
    """
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            for name in ("a-1", "a-2", "a-3", "a-4"):
                await create_vm(client, name, "h1", {"tier": "web"})
            r = await client.post("/api/v1/vms/a-2/pause", params={"wait": 10})
            assert r.status_code == 200, r.text
            body = {"action": "pause", "selector": "tier=web", "max_parallel": 2}
            op = (await client.post("/api/v1/actions", json=body, params={"wait": 30})).json()
            assert op["state"] == "succeeded", op
            assert op["params"]["results"] == {
                "a-1": "done", "a-2": "done: already paused", "a-3": "done", "a-4": "done"
            }  # fmt: skip
            body = {"action": "resume", "selector": "name in (a-1,a-2)"}
            op = (await client.post("/api/v1/actions", json=body, params={"wait": 30})).json()
            assert op["state"] == "succeeded", op  # every VM runs again

            body = {"action": "resume", "selector": "tier=web", "max_parallel": 1, "stop_after": 2}
            op = (await client.post("/api/v1/actions", json=body, params={"wait": 30})).json()
            results = op["params"]["results"]
            assert op["state"] == "failed", op
            assert results["a-1"].startswith("failed") and results["a-2"].startswith("failed"), results
            assert (
                results["a-3"]
                == results["a-4"]
                == ("skipped: the action stopped after 2 failure(s) (stop_after 2)")
            ), results
            assert "a-1 (" in op["error"] and "a-2 (" in op["error"] and "2 skipped" in op["error"], op[
                "error"
            ]
            children = (await client.get("/api/v1/operations", params={"parent": op["op_id"]})).json()
            assert children["operations"] == [], "a refused resume starts no operation"


async def test_bulk_maintenance_flags_the_selected_hosts_only(mosquitto, tmp_path) -> None:
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for h in ("h1", "h2", "h3"):
            await fleet.add_agent(h)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            for h in ("h1", "h2"):
                r = await client.patch(f"/api/v1/hosts/{h}", json={"labels": {"rack": "3"}})
                assert r.status_code == 200, r.text
            body = {"action": "maintenance", "selector": "rack=3", "on": True}
            dry = (await client.post("/api/v1/actions", json={**body, "dry_run": True})).json()
            assert dry["targets"] == ["h1", "h2"]
            op = (await client.post("/api/v1/actions", json=body, params={"wait": 10})).json()
            assert op["state"] == "succeeded" and set(op["params"]["results"]) == {"h1", "h2"}, op
            hosts = {h["host_id"]: h["maintenance"] for h in (await client.get("/api/v1/hosts")).json()}
            assert hosts == {"h1": True, "h2": True, "h3": False}
            op = (
                await client.post("/api/v1/actions", json={**body, "on": False}, params={"wait": 10})
            ).json()
            assert op["state"] == "succeeded", op
            hosts = {h["host_id"]: h["maintenance"] for h in (await client.get("/api/v1/hosts")).json()}
            assert hosts == {"h1": False, "h2": False, "h3": False}


async def _cli(url: str, *args: str) -> tuple[int, str, str]:
    """The real CLI in a child process (asynchronously: the controller under test runs in this loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetvisor", *args, "--url", url, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_bulk_label_power_and_migrate_from_the_cli(mosquitto, tmp_path) -> None:
    """Host label -l sets labels on the selected hosts only; host power -l off on hosts without a power
    method fails for each with the fix (configure a BMC); vm migrate -l moves the selected VMs with
    the given policy.
    """
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for h in ("h1", "h2", "h3"):
            await fleet.add_agent(h)
        url = fleet.api_url
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for name in ("web-1", "web-2", "db-1"):
                await create_vm(client, name, "h1", {"tier": name.split("-")[0]})
            code, out, err = await _cli(url, "host", "label", "-l", "name in (h1,h2)", "rack=3", "old-")
            assert code == 0, err
            labels = {h["host_id"]: h["labels"] for h in (await client.get("/api/v1/hosts")).json()}
            assert labels["h1"].get("rack") == labels["h2"].get("rack") == "3" and "rack" not in labels["h3"]
            code, out, err = await _cli(url, "host", "label", "-l", "rack=3", "bad")
            assert code == 1 and "KEY=VALUE" in err, (code, err)

            code, out, err = await _cli(url, "host", "power", "-l", "rack=3", "off")
            assert code == 1, (out, err)
            assert "h1:" in out and "h2:" in out and "--bmc-config" in out, out
            hosts = {h["host_id"]: h for h in (await client.get("/api/v1/hosts")).json()}
            assert all(hosts[h]["online"] and hosts[h]["power_state"] == "on" for h in hosts), hosts

            code, out, err = await _cli(
                url, "vm", "migrate", "-l", "tier=web", "--to", "h2", "--bandwidth", "300"
            )
            assert code == 0, err
            assert "all 2 done" in out, out
            vms = {v["name"]: v["host_id"] for v in (await client.get("/api/v1/vms")).json()}
            assert vms == {"web-1": "h2", "web-2": "h2", "db-1": "h1"}, vms
            moves = (await client.get("/api/v1/operations", params={"kind": "migrate"})).json()["operations"]
            assert sorted(m["params"]["policy"]["bandwidth_mib_s"] for m in moves) == [300.0, 300.0]


async def test_vm_labels_one_by_one_and_by_selector_and_the_reserved_ones_stay(mosquitto, tmp_path) -> None:
    """Vm label NAME sets and removes labels; vm label -l labels every VM that matches (a bulk action
    with kind vm) and no other; a fleetvisor.io/ key (the placement group) is refused and nothing
    changes; a kind that does not fit the action is a 400.
    """
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        url = fleet.api_url
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for name in ("web-1", "web-2", "db-1"):
                await create_vm(client, name, "h1", {"tier": name.split("-")[0], "old": "x"})
            grouped = {"name": "g-1", "memory_mib": 64, "scheduling": {"group": "g"}}
            assert (await client.post("/api/v1/vms", json=grouped, params={"wait": 10})).status_code == 200

            code, out, err = await _cli(url, "vm", "label", "db-1", "owner=ann", "old-")
            assert code == 0 and "vm db-1: labels owner=ann, tier=db" in out, (out, err)
            code, out, err = await _cli(url, "vm", "label", "-l", "tier=web", "owner=bob", "old-")
            assert code == 0 and "all 2 done" in out, (out, err)
            labels = {v["name"]: v["spec"]["labels"] for v in (await client.get("/api/v1/vms")).json()}
            assert labels["web-1"] == labels["web-2"] == {"tier": "web", "owner": "bob"}, labels
            assert labels["db-1"] == {"tier": "db", "owner": "ann"}, labels
            states = {v["name"]: v["state"] for v in (await client.get("/api/v1/vms")).json()}
            assert set(states.values()) == {"running"}, "labels are metadata: no VM was touched"
            events = (await client.get("/api/v1/events", params={"limit": 1000})).json()
            assert sum(e["type"] == "vm.labels" for e in events) == 3

            before = (await client.get("/api/v1/vms/g-1")).json()["spec"]["labels"]
            r = await client.patch("/api/v1/vms/g-1", json={"labels": {"fleetvisor.io/group": None}})
            assert r.status_code == 400 and r.json()["error"]["code"] == "reserved_label", r.text
            assert "choose a key without that prefix" in r.json()["error"]["message"]
            assert (await client.get("/api/v1/vms/g-1")).json()["spec"]["labels"] == before
            assert before.get("fleetvisor.io/group") == "g"

            r = await client.post("/api/v1/actions", json={"action": "stop", "kind": "host", "selector": ""})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_kind", r.text
            dry = {
                "action": "label",
                "kind": "vm",
                "selector": "tier=web",
                "labels": {"x": "1"},
                "dry_run": True,
            }
            r = await client.post("/api/v1/actions", json=dry)
            assert r.json()["targets"] == ["web-1", "web-2"], r.text
