"""Failed and offline hosts handled for the operator, on a real controller with sim agents over a real
Mosquitto: commands fail at once with what to do, confirm-down lets HA restart, forget removes a host
gone for good, evacuation of an offline host ends, maintenance drains stopped VMs too and keeps the
last host for HA VMs.
"""

from __future__ import annotations

from typing import Any

import httpx

from controller.security import auth
from tests.support.fleet import Fleet, eventually


async def _create(client: httpx.AsyncClient, name: str, **extra: Any) -> dict[str, Any]:
    r = await client.post("/api/v1/vms", json={"name": name, "memory_mib": 256, **extra}, params={"wait": 10})
    assert r.status_code == 200, r.text
    return dict(r.json()["vm"])


async def _offline(fleet: Fleet, host: str) -> None:
    await fleet.stop_agent(host)
    await eventually(lambda: not fleet.ctl.store.host(host).online, 10, f"{host} offline")  # type: ignore[union-attr]


def test_confirm_down_and_forget_need_the_admin_role() -> None:
    """Overriding what the controller can check is for admins; other host routes need less."""
    assert auth.required_role("POST", "/api/v1/hosts/h1/confirm-down") == "admin"
    assert auth.required_role("DELETE", "/api/v1/hosts/h1") == "admin"
    assert auth.required_role("PATCH", "/api/v1/hosts/h1") == "operator"
    assert auth.required_role("GET", "/api/v1/hosts/h1") == "viewer"


async def test_a_command_for_a_vm_on_an_offline_host_fails_at_once_and_says_what_to_do(mosquitto, tmp_path):
    """stop, stop --force, migrate: 409 naming the host's state and the fix; no operation is left running."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("h1", "h2"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            await _create(client, "stuck", scheduling={"start_on": "h1"})
            await _offline(fleet, "h1")
            for path, body in (("stop", {}), ("stop", {"force": True}), ("migrate", {"to": "h2"})):
                r = await client.post(f"/api/v1/vms/stuck/{path}", json=body)
                assert r.status_code == 409, r.text
                error = r.json()["error"]
                assert error["code"] == "host_unreachable", error
                assert "h1 is offline" in error["message"] and "confirm-down h1" in error["message"]
            assert fleet.ctl.store.running_operations() == []
            assert fleet.ctl.store.vm("stuck").op_id is None  # type: ignore[union-attr]


async def test_confirm_down_fences_the_host_and_ha_restarts_its_vms_without_configured_fencing(
    mosquitto, tmp_path
):
    """With --ha-fencing none nothing restarts; confirm-down marks the host fenced and HA restarts it."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("h1", "h2"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            await _create(client, "db", ha=True, scheduling={"start_on": "h1"})
            r = await client.post("/api/v1/hosts/h1/confirm-down")
            assert r.status_code == 409 and r.json()["error"]["code"] == "host_online", r.text
            await _offline(fleet, "h1")
            assert fleet.ctl.store.vm("db").host_id == "h1", "no fencing configured: HA leaves it"  # type: ignore[union-attr]
            r = await client.post("/api/v1/hosts/h1/confirm-down")
            assert r.status_code == 200 and r.json()["restarts"] == 1, r.text
            assert r.json()["host"]["health"] == "fenced"
            await eventually(
                lambda: (
                    (v := fleet.ctl.store.vm("db")) is not None and v.host_id == "h2" and v.state == "running"
                ),
                10,
                "db restarted on h2",
            )
            assert "db" in {s.name for s in await fleet.drivers["h2"].list()}
            events = [e["type"] for e in (await client.get("/api/v1/events", params={"limit": 1000})).json()]
            assert "host.confirmed_down" in events and "ha.restarting" in events


async def test_forget_removes_a_host_gone_for_good_and_its_records_but_never_an_online_one(
    mosquitto, tmp_path
):
    """DELETE /hosts/H refuses an online host; for an offline one it removes the host and its VMs' records."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("h1", "h2"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            await _create(client, "lost", scheduling={"start_on": "h1"})
            r = await client.delete("/api/v1/hosts/h1")
            assert r.status_code == 409 and r.json()["error"]["code"] == "host_online"
            await _offline(fleet, "h1")
            r = await client.delete("/api/v1/hosts/h1")
            assert r.status_code == 200 and r.json()["vms_removed"] == ["lost"], r.text
            assert [h["host_id"] for h in (await client.get("/api/v1/hosts")).json()] == ["h2"]
            assert fleet.ctl.store.vm("lost") is None and "h1" not in fleet.ctl.store.usage()


async def test_evacuating_an_offline_host_does_what_it_can_and_ends(mosquitto, tmp_path):
    """Off a fenced host the HA VM restarts elsewhere; the other VM is reported as not moved, with why."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("h1", "h2"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            await _create(client, "plain", scheduling={"start_on": "h1"})
            await _offline(fleet, "h1")
            r = await client.post("/api/v1/hosts/h1/evacuate", params={"wait": 20})
            assert r.status_code == 200, r.text
            done = r.json()
            assert (
                done["state"] == "failed" and "plain" in done["error"] and "not an HA VM" in done["error"]
            ), done
            assert fleet.ctl.store.running_operations() == []


async def test_maintenance_moves_stopped_vms_too_so_the_host_is_left_empty(mosquitto, tmp_path):
    """A stopped VM's definition moves with its host's evacuation (a cold move): nothing stays behind."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("h1", "h2"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            await _create(client, "idle", scheduling={"start_on": "h1"})
            r = await client.post("/api/v1/vms/idle/stop", params={"wait": 10})
            assert r.json()["state"] == "succeeded", r.text
            assert (await client.patch("/api/v1/hosts/h1", json={"maintenance": True})).status_code == 200
            r = await client.post("/api/v1/hosts/h1/evacuate", params={"wait": 20})
            assert r.json()["state"] == "succeeded" and "h1 is empty" in r.json()["error"], r.text
            vm = fleet.ctl.store.vm("idle")
            assert vm is not None and vm.host_id == "h2" and vm.state == "stopped"
            assert "idle" in {s.name for s in await fleet.drivers["h2"].list()}
            assert "idle" not in {s.name for s in await fleet.drivers["h1"].list()}


async def test_maintenance_refuses_to_drain_the_last_host_for_ha_vms_unless_forced(mosquitto, tmp_path):
    """With the other host in maintenance, draining the last one would strand the HA VMs: 409, --force works."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host in ("h1", "h2"):
            await fleet.add_agent(host)
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            await _create(client, "keeper", ha=True, scheduling={"start_on": "h1"})
            assert (await client.patch("/api/v1/hosts/h2", json={"maintenance": True})).status_code == 200
            r = await client.patch("/api/v1/hosts/h1", json={"maintenance": True})
            assert r.status_code == 409 and r.json()["error"]["code"] == "last_ha_host", r.text
            assert "keeper" in r.json()["error"]["message"] and "--force" in r.json()["error"]["message"]
            assert not fleet.ctl.store.host("h1").maintenance  # type: ignore[union-attr]
            r = await client.patch("/api/v1/hosts/h1", json={"maintenance": True, "force": True})
            assert r.status_code == 200 and r.json()["maintenance"] is True
