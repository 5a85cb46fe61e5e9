"""The trace simulator runs planned moves through the live controller's scheduler (SchedulerGate)."""

from __future__ import annotations

import dataclasses

import numpy as np

from controller.balancer.evaluation import make_policy, simulate
from controller.balancer.evaluation.gate import SchedulerGate
from controller.balancer.planner import FleetvisorPolicy
from tests.controller.balancer.support import ScriptedPolicy, small_fleet, snapshot, trace


def test_a_move_onto_a_host_without_room_for_its_ram_is_refused_by_the_scheduler():
    """On a fleet whose RAM binds, a scripted move that would overbook RAM is dropped and counted."""
    fleet = dataclasses.replace(
        small_fleet([1000, 1000], [200, 200, 200], vm_ram_mb=[3000, 3000, 500]), host_ram_mb=4096.0
    )
    policy = ScriptedPolicy(placement=[0, 1, 1], moves={1: [(0, 1)], 2: [(2, 0)]})
    metrics = simulate(trace([[0.2] * 4] * 3), policy, fleet=fleet, gated=True).metrics
    assert metrics.gated and metrics.vetoed == 1  # vm0 (3000 MB) does not fit beside 3500 MB
    assert metrics.migrations == 1  # vm2's move (500 MB onto host 0) went ahead


def test_the_gate_claims_on_both_hosts_while_a_vm_moves_and_releases_the_source_when_it_lands():
    """Admit claims the target, landed frees the source: the live scheduler's accounting, step by step."""
    fleet = dataclasses.replace(small_fleet([1000, 1000], [200], vm_ram_mb=[1000]), host_ram_mb=4096.0)
    gate = SchedulerGate(fleet)
    gate.place(np.array([0]))
    assert gate.admit([(0, 1)], np.array([0])) == [(0, 1)]
    assert [c.host_id for c in gate.state.claims("vm0")] == ["h0", "h1"]
    assert gate.state.usage("h1").memory_mib == 1000
    gate.landed(0, 0)
    assert [c.host_id for c in gate.state.claims("vm0")] == ["h1"]
    assert gate.state.usage("h0").memory_mib == 0


def test_a_host_the_scheduler_excludes_gets_no_vm_from_the_simulator():
    """A host in maintenance in the gate's fleet state: the planner's move there is refused, with the reason."""
    fleet = dataclasses.replace(small_fleet([1000, 1000], [200], vm_ram_mb=[500]), host_ram_mb=4096.0)
    gate = SchedulerGate(fleet)
    gate.place(np.array([0]))
    gate.state.set_maintenance("h1", True)
    assert gate.admit([(0, 1)], np.array([0])) == []
    assert gate.vetoed == 1 and "maintenance" in gate.reasons[0]


def test_the_planner_proposes_no_move_the_scheduler_would_refuse_on_a_fleet_whose_ram_binds():
    """Consolidation of a light host stops at RAM: the planner only proposes moves that fit."""
    fleet = dataclasses.replace(
        small_fleet([1000, 1000, 1000], [100, 100, 100], vm_ram_mb=[3000, 3000, 500]), host_ram_mb=4096.0
    )
    snap = snapshot(fleet, [[0], [1], [2]], [50, 50, 50], history=[[0.5] * 12] * 3)
    moves = FleetvisorPolicy().plan(snap)
    gate = SchedulerGate(fleet)
    gate.place(np.array([0, 1, 2]))
    assert gate.admit(moves, snap.vm_host) == moves and gate.vetoed == 0
    ram = np.bincount(snap.vm_host, weights=fleet.vm_ram_mb, minlength=3)
    for vm, target in moves:
        ram[snap.vm_host[vm]] -= fleet.vm_ram_mb[vm]
        ram[target] += fleet.vm_ram_mb[vm]
    assert (ram <= 4096).all()
    assert any(vm == 2 for vm, _ in moves), moves  # the small VM still consolidates


def test_fleetvisor_on_the_standard_setup_is_gated_and_the_baselines_are_not():
    """simulate() gates Fleetvisor's policy by default (CloudSim's figures need ungated baselines)."""
    rows = [[0.1, 0.1, 0.1, 0.1]] * 4
    ours = simulate(trace(rows), make_policy("fleetvisor"), fleet=small_fleet([3000] * 4, [500] * 4)).metrics
    base = simulate(trace(rows), make_policy("thr-mmt"), fleet=small_fleet([3000] * 4, [500] * 4)).metrics
    assert ours.gated and not base.gated


def test_the_planner_checks_each_hosts_own_ram_where_hosts_differ():
    """host_ram_each: a move that fits the largest host but not its target is not proposed."""
    fleet = dataclasses.replace(
        small_fleet([1000, 1000, 1000], [100, 100, 100], vm_ram_mb=[1500, 1500, 1000]),
        host_ram_mb=4096.0,
        host_ram_each=np.array([2000.0, 2000.0, 4096.0]),
    )
    snap = snapshot(fleet, [[0], [1], [2]], [50, 50, 50], history=[[0.5] * 12] * 3)
    moves = FleetvisorPolicy().plan(snap)
    assert all(not (target in (0, 1) and vm != 2) for vm, target in moves), moves
    assert (0, 2) in moves or (1, 2) in moves, moves  # the big host takes them
