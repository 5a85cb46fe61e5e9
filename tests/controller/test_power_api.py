"""The power manager through the REST API and the CLI: plans with reasons, apply, automation levels,
operator power actions and energy per host, on in-process fleets with sim power.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

import fleetvisor
from controller import cli as operator_cli
from controller.daemon import FleetSettings
from controller.hardware import SimPowerDriver
from controller.security import auth
from tests.controller.test_power_manager import SIM, make_vm, power_fleet, spread_light, standby
from tests.support.fleet import Fleet, eventually
from tests.support.power import AgentPower
from tests.support.processes import ROOT


async def _cli(fleet: Fleet, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run an operator command against the fleet's API (in a thread: the API serves on this loop)."""
    args = fleetvisor.build_parser().parse_args([*argv, "--url", fleet.api_url])
    code = await asyncio.to_thread(operator_cli.run_operator_command, args)
    out = capsys.readouterr()
    return code, out.out + out.err


async def test_plan_gives_each_move_a_reason_and_apply_executes_it_once(mosquitto, tmp_path, capsys):
    """GET /plan explains every move; `fleetvisor plan --apply` carries it out once; later rounds do not."""
    async with power_fleet(mosquitto.url, tmp_path, ("h1", "h2"), spare_hosts=0) as fleet:
        await spread_light(fleet, per_host=1)
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=30) as client:
            plan = (await client.get("/plan")).json()
            assert plan["mode"] == "manual" and len(plan["moves"]) == 1, plan
            (move,) = plan["moves"]
            assert move["kind"] == "consolidate" and move["reason"].startswith(
                f"consolidate {move['source']}: "
            )
            assert "kWh over an hour for 1 migration(s)" in move["reason"]
            code, text = await _cli(fleet, capsys, "plan")
            assert code == 0 and move["reason"] in text
            code, text = await _cli(fleet, capsys, "plan", "--apply", "--json")
            assert code == 0, text
            outcome = json.loads(text)
            assert [(r["kind"], r["ok"]) for r in outcome["results"]] == [("move", True)], outcome
            vms = {v["name"]: v["host_id"] for v in (await client.get("/vms")).json()}
            assert set(vms.values()) == {move["target"]}
            await asyncio.sleep(1.0)  # manual: nothing more happens on its own
            assert standby(fleet) == set()
            # The emptied host has been empty for idle_rounds now: the next plan puts it in standby.
            plan = (await client.get("/plan")).json()
            assert [(a["host_id"], a["action"]) for a in plan["power"]] == [(move["source"], "standby")], plan
            outcome = (await client.post("/plan/apply")).json()
            assert [(r["kind"], r["ok"]) for r in outcome["results"]] == [("standby", True)], outcome
            assert standby(fleet) == {move["source"]}
            host = (await client.get(f"/hosts/{move['source']}")).json()
            assert (
                host["power_state"] == "standby" and host["standby_since"] and host["power_method"] == "sim"
            )


async def test_automation_levels_switch_through_the_api_and_apply_is_refused_at_auto(
    mosquitto, tmp_path, capsys
):
    """PUT /power/mode and `fleetvisor power mode` switch levels; apply at auto is a 409 that says what to do."""
    async with power_fleet(mosquitto.url, tmp_path, ("h1",)) as fleet:
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=10) as client:
            r = await client.put("/power/mode", json={"mode": "auto"})
            assert r.status_code == 200 and r.json()["mode"] == "auto"
            r = await client.post("/plan/apply")
            assert r.status_code == 409 and "switch to recommend or manual" in r.json()["error"]["message"]
            r = await client.put("/power/mode", json={"mode": "turbo"})
            assert r.status_code == 400 and "mode" in r.json()["error"]["message"]
            code, text = await _cli(fleet, capsys, "power", "mode", "recommend")
            assert code == 0 and "recommend" in text
            assert fleet.ctl.power.mode == "recommend"
            code, text = await _cli(fleet, capsys, "power", "status")
            assert code == 0 and "automation level: recommend" in text and "h1" in text
        kinds = [e.message for e in fleet.ctl.store.events_since(0, 1000) if e.type == "power.mode"]
        assert kinds == [
            "power manager automation level: manual -> auto",
            "power manager automation level: auto -> recommend",
        ]


async def test_the_level_set_at_run_time_survives_a_restart_unless_the_configuration_names_one(
    mosquitto, tmp_path
):
    """PUT /power/mode is kept in the store: a restarted controller comes back at that level; one
    started with --power-mode uses that level instead, and keeps it for the next restart.
    """
    async with power_fleet(mosquitto.url, tmp_path, ("h1",)) as fleet:
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=10) as client:
            r = await client.put("/power/mode", json={"mode": "recommend"})
            assert r.status_code == 200
        await fleet.stop_controller()
        await fleet.start_controller()
        assert fleet.ctl.power.mode == "recommend"
        power = fleet.fleet_settings.power
        await fleet.stop_controller()
        fleet.fleet_settings = FleetSettings(power=dataclasses.replace(power, mode="manual"))
        await fleet.start_controller()
        assert fleet.ctl.power.mode == "manual"
        await fleet.stop_controller()
        fleet.fleet_settings = FleetSettings(power=power)  # no level configured: the stored one
        await fleet.start_controller()
        assert fleet.ctl.power.mode == "manual"


def test_power_routes_that_change_something_need_the_operator_role():
    """Reading plans and power is for viewers; apply, mode and host power actions need an operator."""
    assert auth.required_role("GET", "/api/v1/plan") == "viewer"
    assert auth.required_role("GET", "/api/v1/hosts/h1/power") == "viewer"
    for path in ("/api/v1/plan/apply", "/api/v1/hosts/h1/power"):
        assert auth.required_role("POST", path) == "operator"
    assert auth.required_role("PUT", "/api/v1/power/mode") == "operator"


async def test_operator_power_actions_check_the_host_and_go_through_the_same_drivers(
    mosquitto, tmp_path, capsys
):
    """Off needs an empty host and a verified wake path; on brings the agent back; no method is a 409."""

    def drivers(fleet: Fleet) -> dict[str, Any]:
        return {"h1": AgentPower(fleet, "h1", sim=SIM), "h2": AgentPower(fleet, "h2", sim=SIM)}

    async with power_fleet(mosquitto.url, tmp_path, ("h1", "h2", "h3"), drivers=drivers) as fleet:
        await make_vm(fleet, "busy", "h1")
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=30) as client:
            r = await client.post("/hosts/h1/power", json={"action": "off"})
            assert r.status_code == 409 and "busy" in r.json()["error"]["message"]
            assert "host evacuate h1" in r.json()["error"]["message"]
            r = await client.post("/hosts/h3/power", json={"action": "off"})
            assert r.status_code == 409 and "--bmc-config" in r.json()["error"]["message"]
            r = await client.post("/hosts/nope/power", json={"action": "on"})
            assert r.status_code == 404
            h2 = fleet.ctl.power.drivers["h2"]
            assert isinstance(h2, SimPowerDriver)
            h2.wake_ok = False
            r = await client.post("/hosts/h2/power", json={"action": "off"})
            assert r.status_code == 409 and "wake path" in r.json()["error"]["message"]
            assert "h2" in fleet.agents and "power_off" not in h2.calls
            h2.wake_ok = True
            code, text = await _cli(fleet, capsys, "host", "power", "h2", "status")
            assert code == 0 and "verified" in text and "power (read by its methods): on" in text
            code, text = await _cli(fleet, capsys, "host", "power", "h2", "off")
            assert code == 0 and "standby" in text, text
            assert standby(fleet) == {"h2"} and "h2" not in fleet.agents
            code, text = await _cli(fleet, capsys, "host", "list")
            assert code == 0 and any(
                line.startswith("h2") and "standby" in line for line in text.splitlines()
            )
            r = await client.post("/hosts/h2/power", json={"action": "on"})
            assert r.status_code == 200 and r.json()["power"]["state"] == "powering-on", r.text
            await eventually(lambda: standby(fleet) == set(), 10, "h2 out of standby")
            assert (await client.get("/hosts/h2")).json()["power_state"] == "on"


async def test_energy_is_counted_per_host_measured_where_the_bmc_can_say_and_survives_a_restart(
    mosquitto, tmp_path, capsys
):
    """A host whose power method reads watts counts them as measured; the others use their power model.
    The counters and their start are kept in the store: a restarted controller counts on top of them.
    """

    def drivers(fleet: Fleet) -> dict[str, Any]:
        return {"h1": AgentPower(fleet, "h1", sim=SIM, watts=180.0), "h2": AgentPower(fleet, "h2", sim=SIM)}

    async with power_fleet(mosquitto.url, tmp_path, ("h1", "h2"), drivers=drivers) as fleet:
        await eventually(
            lambda: all(fleet.ctl.power.meter.kwh(h) > 0 for h in ("h1", "h2")), 10, "energy counted"
        )
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=10) as client:
            hosts = {h["host_id"]: h for h in (await client.get("/hosts")).json()}
        assert hosts["h1"]["energy_source"] == "measured" and hosts["h2"]["energy_source"] == "model"
        assert hosts["h1"]["energy_kwh"] > 0 and hosts["h2"]["energy_kwh"] > 0
        report = fleet.ctl.power.meter.host("h1")
        assert set(report.kwh_by_source) == {"measured"}
        since = hosts["h2"]["energy_since"]
        assert since is not None and abs(since - time.time()) < 60
        code, text = await _cli(fleet, capsys, "host", "show", "h2")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        assert code == 0 and f"kWh since {stamp} (model)" in text and "power:         on, via sim" in text

        # A restarted controller goes on from the saved counters, and counts from the same moment.
        before = {h: fleet.ctl.power.meter.kwh(h) for h in ("h1", "h2")}
        await fleet.stop_controller()
        await fleet.start_controller()
        assert fleet.ctl.power.host_power("h2").energy_since == since
        assert all(fleet.ctl.power.meter.kwh(h) >= kwh > 0 for h, kwh in before.items())
        await eventually(
            lambda: all(fleet.ctl.power.meter.kwh(h) > kwh for h, kwh in before.items()),
            10,
            "energy counted on top of the saved totals",
        )


def test_controller_refuses_bad_power_flags_with_the_reason(tmp_path):
    """`controller --headroom 1.5` (or a broken --wol-config) exits 1 and says what is wrong before starting."""

    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "fleetvisor", "controller", "--db", str(tmp_path / "c.sqlite"), *flags]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)

    bad = run("--headroom", "1.5")
    assert bad.returncode == 1 and "headroom must be within 0..1" in bad.stderr, bad.stderr
    (tmp_path / "wol.json").write_text('{"h1": {"mac": "zz"}}')
    bad = run("--wol-config", str(tmp_path / "wol.json"))
    assert bad.returncode == 1 and "Wake-on-LAN config" in bad.stderr and "'zz'" in bad.stderr, bad.stderr
