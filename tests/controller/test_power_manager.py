"""The power manager on in-process fleets: sim agents on a real Mosquitto, sim power that stops and
starts those agents (:class:`tests.support.power.AgentPower`), and between them the real planner,
migrations, scheduler and HA.

A sim VM's load is its spec's ``workload.cpu_util``; tests change it with ``SimDriver.set_workload``.
A migration's destination copy starts from the controller's record of the spec, so :func:`hold_load`
keeps setting the wanted load on whichever host runs the VM, as a guest's load follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from controller.daemon import FleetSettings
from controller.hardware import FallbackPower, PowerDriver, SimPowerDriver
from controller.scheduler import SchedulingHints
from controller.services.power import PowerSettings
from protocols.vmspec import VmSpec, VmWorkload
from tests.support.fleet import Fleet, eventually
from tests.support.power import AgentPower

SIM = {"cores": 4, "memory_mib": 8192}
FAST = {
    "interval_s": 0.25,
    "idle_rounds": 2,
    "cooldown_s": 1.0,
    "energy_interval_s": 0.2,
    "boot_timeout_s": 15.0,
}
Drivers = Callable[[Fleet], Mapping[str, PowerDriver]]


@contextlib.asynccontextmanager
async def power_fleet(
    broker_url: str,
    root: Any,
    hosts: tuple[str, ...] = ("h1", "h2", "h3"),
    *,
    drivers: Drivers | None = None,
    **settings: Any,
) -> AsyncIterator[Fleet]:
    """A controller (power manager at ``manual`` until the test switches it) and sim agents with sim power."""
    fleet = Fleet(broker_url, root)
    power = {h: AgentPower(fleet, h, sim=SIM) for h in hosts} if drivers is None else drivers(fleet)
    fleet.fleet_settings = FleetSettings(power=PowerSettings(drivers=power, **{**FAST, **settings}))
    async with fleet:
        for h in hosts:
            await fleet.add_agent(h, **SIM)
        try:
            yield fleet
        finally:
            # Nothing may power an agent on while the fleet is being torn down.
            if fleet.controller is not None:
                fleet.ctl.power.set_mode("manual")
                await asyncio.wait_for(fleet.ctl.power.settle(), 30)


async def make_vm(fleet: Fleet, name: str, host: str, cpu: float = 0.1, memory: int = 512) -> None:
    spec = VmSpec(name=name, memory_mib=memory, workload=VmWorkload(cpu_util=cpu, dirty_mib_s=2.0))
    _, op, _ = fleet.ctl.vms.create(spec, hints=SchedulingHints(start_on=host))
    done = await fleet.ctl.operations.wait(op.op_id, 10)
    assert done.state == "succeeded", done.error


@contextlib.asynccontextmanager
async def hold_load(fleet: Fleet, load: dict[str, float]) -> AsyncIterator[dict[str, float]]:
    """Keep each VM's CPU use at ``load[vm]`` on whichever host runs it; the dict may change meanwhile."""

    async def keep() -> None:
        while True:
            for driver in list(fleet.drivers.values()):
                with contextlib.suppress(Exception):  # an agent being stopped by sim power
                    for vm in await driver.list():
                        want = load.get(vm.name)
                        if want is not None and vm.spec.workload.cpu_util != want:
                            driver.set_workload(vm.name, cpu_util=want)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(keep())
    try:
        yield load
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def placement(fleet: Fleet) -> dict[str, str | None]:
    return {vm.name: vm.host_id for vm in fleet.ctl.store.vms()}


def standby(fleet: Fleet) -> set[str]:
    return {h.host_id for h in fleet.ctl.store.hosts() if h.standby_since is not None}


def events(fleet: Fleet, prefix: str = "") -> list[tuple[str, str, str]]:
    return [
        (e.type, e.host_id, e.message)
        for e in fleet.ctl.store.events_since(0, 10_000)
        if e.type.startswith(prefix)
    ]


def migrations(fleet: Fleet) -> list[Any]:
    rows = fleet.ctl.store.connection.execute(
        "SELECT op_id FROM operations WHERE kind='migrate' ORDER BY created_at"
    ).fetchall()
    return [fleet.ctl.store.operation(r[0]) for r in rows]


async def all_running_once(fleet: Fleet) -> None:
    """Every VM in the store runs on exactly one host, the one its record names."""
    reported: dict[str, list[str]] = {}
    for host_id, driver in fleet.drivers.items():
        for vm in await driver.list():
            if vm.state == "running":
                reported.setdefault(vm.name, []).append(host_id)
    for vm in fleet.ctl.store.vms():
        assert vm.state == "running" and reported.get(vm.name) == [vm.host_id], (vm, reported)


async def spread_light(fleet: Fleet, per_host: int = 2, cpu: float = 0.1) -> list[str]:
    names = []
    for host in sorted(fleet.agents):
        for i in range(per_host):
            names.append(f"{host}-vm{i}")
            await make_vm(fleet, names[-1], host, cpu=cpu)
    return names


async def test_consolidation_empties_lightly_loaded_hosts_and_puts_them_in_standby(mosquitto, tmp_path):
    """Six light VMs on three hosts end on one; the emptied hosts are verified, marked standby, powered off."""
    async with power_fleet(mosquitto.url, tmp_path, spare_hosts=0) as fleet:
        await spread_light(fleet)
        fleet.ctl.power.set_mode("auto")
        await eventually(lambda: len(standby(fleet)) == 2, 20, "two hosts in standby")
        (kept,) = set(placement(fleet).values())
        ctl = fleet.ctl
        for host_id in standby(fleet):
            assert host_id not in fleet.agents, "sim power stopped the agent"
            calls = ctl.settings.fleet.power.drivers[host_id].calls  # type: ignore[attr-defined]
            assert [c for c in calls if c != "power_reading_w"] == ["verify_wake_path", "power_off"]
            assert not ctl.fleet_state.host(host_id).powered_on
            assert ctl.power.host_power(host_id).state == "standby"
        await all_running_once(fleet)
        moves = [m for t, _, m in events(fleet, "power.move")]
        assert moves and all(m.startswith("consolidate ") and "kWh" in m for m in moves), moves
        await asyncio.sleep(1.0)  # HA keeps watching: a standby host is never suspect, failed or fenced
        assert not [e for e in events(fleet, "host.") if e[0] in ("host.suspect", "host.failed")]
        assert not events(fleet, "ha.")
        assert kept not in standby(fleet)


async def test_rising_load_powers_a_standby_host_on_and_the_planner_spreads(mosquitto, tmp_path):
    """Load rises past one host: a standby host is powered on, its agent rejoins, VMs move onto it."""
    async with power_fleet(mosquitto.url, tmp_path, spare_hosts=0) as fleet:
        names = await spread_light(fleet)
        async with hold_load(fleet, dict.fromkeys(names, 0.1)) as load:
            fleet.ctl.power.set_mode("auto")
            await eventually(lambda: len(standby(fleet)) == 2, 20, "two hosts in standby")
            woken = standby(fleet)
            load.update(dict.fromkeys(names, 0.9))  # 5.4 cores of demand on a 4-core host
            await eventually(lambda: len(set(placement(fleet).values())) >= 2, 20, "VMs spread again")
            back = woken - standby(fleet)
            assert back, "a standby host was powered on"
            assert all(h in fleet.agents for h in back)
            texts = [m for t, h, m in events(fleet, "power.on")]
            assert any("overloaded" in m or "forecast demand" in m for m in texts), texts
            assert any("reported in" in m for m in texts), texts
            await eventually(lambda: not fleet.ctl.store.running_operations(), 10, "moves done")
            await all_running_once(fleet)


async def test_spare_hosts_stay_on_when_empty(mosquitto, tmp_path):
    """With spare_hosts=1, of two empty hosts only one goes to standby; the other stays on for new VMs."""
    async with power_fleet(mosquitto.url, tmp_path, spare_hosts=1) as fleet:
        await make_vm(fleet, "only", "h1")
        fleet.ctl.power.set_mode("auto")
        await eventually(lambda: len(standby(fleet)) == 1, 10, "one host in standby")
        await asyncio.sleep(1.5)  # several more rounds
        assert len(standby(fleet)) == 1
        assert placement(fleet) == {"only": "h1"}
        plan = fleet.ctl.power.plan
        assert plan is not None and any("spare host" in note for note in plan.notes), plan


async def test_headroom_keeps_enough_hosts_on_for_the_forecast_demand(mosquitto, tmp_path):
    """An empty host stays on when the hosts left would keep less free CPU than headroom (plus margin)."""
    async with power_fleet(mosquitto.url, tmp_path, ("h1", "h2"), spare_hosts=0, headroom=0.4) as fleet:
        for i in range(4):  # 2.8 of h1's 4 cores busy: 30% free, under the 40% (+10%) wanted
            await make_vm(fleet, f"busy-{i}", "h1", cpu=0.7)
        fleet.ctl.power.set_mode("auto")
        await asyncio.sleep(2.0)
        assert standby(fleet) == set()
        plan = fleet.ctl.power.plan
        assert plan is not None and any(
            "h2 is empty but stays on" in n and "headroom" in n for n in plan.notes
        )


async def test_a_host_whose_wake_path_cannot_be_verified_is_never_powered_off(mosquitto, tmp_path):
    """An empty host whose wake path fails its check stays on; power_off is never called; one event says why."""

    def drivers(fleet: Fleet) -> dict[str, PowerDriver]:
        return {"h1": AgentPower(fleet, "h1", sim=SIM), "h2": AgentPower(fleet, "h2", sim=SIM, wake_ok=False)}

    async with power_fleet(mosquitto.url, tmp_path, ("h1", "h2"), drivers=drivers, spare_hosts=0) as fleet:
        await make_vm(fleet, "only", "h1")
        fleet.ctl.power.set_mode("auto")
        await asyncio.sleep(2.0)
        assert standby(fleet) == set() and "h2" in fleet.agents
        h2 = fleet.ctl.settings.fleet.power.drivers["h2"]
        assert isinstance(h2, SimPowerDriver)
        assert "verify_wake_path" in h2.calls and "power_off" not in h2.calls
        refused = events(fleet, "power.standby_refused")
        assert len(refused) == 1 and refused[0][1] == "h2" and "wake path" in refused[0][2], refused


def _two_methods(fleet: Fleet, host: str) -> FallbackPower:
    """IPMI then Wake-on-LAN, both sim power of the same agent (WoL cannot power off)."""
    return FallbackPower(
        [
            AgentPower(fleet, host, sim=SIM, method="ipmi"),
            AgentPower(fleet, host, sim=SIM, method="wol", can_power_off=False),
        ]
    )


async def _into_standby(fleet: Fleet, names: list[str], count: int) -> None:
    fleet.ctl.power.set_mode("auto")
    await eventually(lambda: len(standby(fleet)) == count, 20, f"{count} host(s) in standby")


async def test_a_failed_power_on_falls_back_to_the_next_method(mosquitto, tmp_path):
    """IPMI fails to power the host on; Wake-on-LAN wakes it; the event names both."""
    async with power_fleet(
        mosquitto.url, tmp_path, ("h1", "h2"), drivers=lambda f: {h: _two_methods(f, h) for h in ("h1", "h2")},
        spare_hosts=0,
    ) as fleet:  # fmt: skip
        names = await spread_light(fleet)
        async with hold_load(fleet, dict.fromkeys(names, 0.1)) as load:
            await _into_standby(fleet, names, 1)
            (off,) = standby(fleet)
            chain = fleet.ctl.power.drivers[off]
            assert isinstance(chain, FallbackPower)
            ipmi, wol = chain.drivers
            assert isinstance(ipmi, SimPowerDriver) and isinstance(wol, SimPowerDriver)
            ipmi.fail_power_on = True
            load.update(dict.fromkeys(names, 0.9))
            await eventually(lambda: off in fleet.agents and off not in standby(fleet), 20, f"{off} back on")
            assert "power_on" in ipmi.calls and "power_on" in wol.calls
            powered = [m for t, h, m in events(fleet, "power.on") if h == off and "via wol" in m]
            assert powered and "ipmi failed" in powered[0], powered
            assert not events(fleet, "power.alert")


async def test_when_every_method_fails_an_alert_names_each_error_and_another_standby_host_is_tried(
    mosquitto, tmp_path
):
    """All of h2's methods fail: power.alert names h2, each method and what to check; h3 is woken instead."""
    async with power_fleet(
        mosquitto.url, tmp_path, drivers=lambda f: {h: _two_methods(f, h) for h in ("h1", "h2", "h3")},
        spare_hosts=0,
    ) as fleet:  # fmt: skip
        names = await spread_light(fleet)
        async with hold_load(fleet, dict.fromkeys(names, 0.1)) as load:
            await _into_standby(fleet, names, 2)
            first = sorted(standby(fleet))[0]  # equal hosts: the planner wakes the lowest id first
            other = sorted(standby(fleet))[1]
            chain = fleet.ctl.power.drivers[first]
            assert isinstance(chain, FallbackPower)
            for method in chain.drivers:
                assert isinstance(method, SimPowerDriver)
                method.fail_power_on = True
            load.update(dict.fromkeys(names, 0.8))  # 4.8 cores: one more host is enough
            await eventually(lambda: other in fleet.agents and other not in standby(fleet), 20, f"{other} on")
            alerts = events(fleet, "power.alert")
            assert alerts and alerts[0][1] == first, alerts
            text = alerts[0][2]
            assert f"host {first}" in text and "[ipmi" in text and "[wol" in text and "check:" in text, text
            assert first in standby(fleet), "the host that could not be woken stays in standby"
            woke = [m for t, h, m in events(fleet, "power.on") if h == other]
            assert any(f"instead of {first}" in m for m in woke), woke


async def test_recommend_mode_changes_nothing_but_publishes_the_plan(mosquitto, tmp_path):
    """At recommend the plan (moves and reasons) is kept and published as events; no VM moves, no power call."""
    async with power_fleet(mosquitto.url, tmp_path, spare_hosts=0) as fleet:
        await spread_light(fleet)
        await asyncio.sleep(0.5)  # the new VMs' telemetry is in
        fleet.ctl.power.set_mode("recommend")
        plan = await eventually(
            lambda: (p := fleet.ctl.power.plan) is not None and p.moves and p, 10, "a plan"
        )
        assert all(
            m.kind == "consolidate" and m.reason.startswith(f"consolidate {m.source}:") for m in plan.moves
        )
        await asyncio.sleep(2.0)
        assert migrations(fleet) == [] and standby(fleet) == set()
        for driver in fleet.ctl.power.drivers.values():
            assert isinstance(driver, SimPowerDriver)
            assert [c for c in driver.calls if c != "power_reading_w"] == []
        published = events(fleet, "power.")
        assert [t for t, _, _ in published].count("power.plan") == 1, "an unchanged plan is published once"
        recommended = [m for t, _, m in published if t == "power.recommend"]
        assert recommended == [m.reason for m in plan.moves] + [a.reason for a in plan.power]


async def test_manual_mode_does_nothing_on_its_own(mosquitto, tmp_path):
    """At manual (the default) no plan is computed, nothing moves and no host is switched."""
    async with power_fleet(mosquitto.url, tmp_path, spare_hosts=0) as fleet:
        await spread_light(fleet)
        await asyncio.sleep(2.0)
        manager = fleet.ctl.power
        assert manager.mode == "manual" and manager.round >= 4
        assert manager.plan is None and migrations(fleet) == [] and standby(fleet) == set()
        assert events(fleet, "power.") == []


async def test_a_fluctuating_load_never_moves_a_vm_twice_within_its_cooldown(mosquitto, tmp_path):
    """Load alternating high and low every round: VMs move, but none twice within cooldown_s (store ops)."""
    cooldown = 4.0
    async with power_fleet(
        mosquitto.url, tmp_path, spare_hosts=3, cooldown_s=cooldown, max_migrations_per_round=8
    ) as fleet:
        names = [f"h1-vm{i}" for i in range(5)] + ["h2-vm0", "h3-vm0"]
        for name in names:
            await make_vm(fleet, name, name.split("-")[0])
        manager = fleet.ctl.power
        async with hold_load(fleet, dict.fromkeys(names, 0.05)) as load:
            manager.set_mode("auto")
            for _ in range(28):  # 7 s of rounds
                seen = manager.round
                await eventually(lambda seen=seen: manager.round > seen, 5, "the next round")
                high = manager.round % 2 == 0
                load.update({n: (0.95 if high else 0.05) for n in names})
        ops = migrations(fleet)
        assert ops, "the load swings made the manager move something"
        by_vm: dict[str, list[float]] = {}
        for op in ops:
            by_vm.setdefault(op.vm, []).append(op.created_at)
        for vm, times in by_vm.items():
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(gap >= cooldown for gap in gaps), (vm, gaps)
        await eventually(lambda: not fleet.ctl.store.running_operations(), 10, "moves done")
        await all_running_once(fleet)


async def test_standby_is_remembered_across_a_controller_restart(mosquitto, tmp_path):
    """A restarted controller still knows the standby host: not placeable, not failed, shown as standby."""
    async with power_fleet(mosquitto.url, tmp_path, ("h1", "h2"), spare_hosts=0) as fleet:
        await make_vm(fleet, "only", "h1")
        await _into_standby(fleet, ["only"], 1)
        fleet.ctl.power.set_mode("manual")  # the next controller keeps this level and stays passive
        await fleet.ctl.power.settle()
        await fleet.stop_controller()
        await fleet.start_controller()
        ctl = fleet.ctl
        assert ctl.power.mode == "manual"
        assert ctl.power.host_power("h2").state == "standby"
        assert not ctl.fleet_state.host("h2").powered_on and "h2" in ctl.standby
        decision = ctl.vms.plan(VmSpec(name="new", memory_mib=256), SchedulingHints(hosts=("h2",)))
        assert decision.host_id is None and "powered off" in decision.refusal.message  # type: ignore[union-attr]
        await asyncio.sleep(1.0)
        assert not [e for e in events(fleet, "host.") if e[0] in ("host.suspect", "host.failed")]
