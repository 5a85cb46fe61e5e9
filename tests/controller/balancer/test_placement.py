"""PABFD as CloudSim codes it: least power rise over the measured power, headroom, ties to the lowest id."""

from __future__ import annotations

import numpy as np

from controller.balancer.evaluation.detectors import LocalRegressionDetector, ThresholdDetector
from controller.balancer.evaluation.placement import find_host
from controller.balancer.evaluation.planning_state import PlanningState
from tests.controller.balancer.support import LINEAR_W, small_fleet, snapshot

FLAT_W = tuple(100.0 + 2.0 * i for i in range(11))
THR = ThresholdDetector(0.8)


def _place(fleet, host_vms, requested, vm, excluded_hosts, detector=THR, history=None):
    snap = snapshot(fleet, host_vms, requested, history=history)
    plan = PlanningState(snap)
    excluded = np.zeros(fleet.hosts, dtype=bool)
    excluded[excluded_hosts] = True
    power_now = fleet.power(np.arange(fleet.hosts), snap.host_utilization)
    return find_host(plan, vm, excluded, detector, power_now)


def test_the_least_power_rise_wins():
    """Adding 20 % costs 20 W on the steep host and 4 W on the flat one: the flat one wins."""
    fleet = small_fleet([1000, 1000, 1000], [100, 100, 200], tables=[LINEAR_W, FLAT_W], kinds=[0, 1, 0])
    assert _place(fleet, [[0], [1], [2]], [100, 100, 200], vm=2, excluded_hosts=[2]) == 1


def test_ties_go_to_the_lowest_host_id_and_switched_off_hosts_cost_only_dynamic_power():
    """An active host at 50 % and a switched-off one both rise 10 W for 10 %: host 0 wins the tie."""
    fleet = small_fleet([1000, 1000, 1000], [500, 100], vm_ram_mb=[625, 625])
    assert _place(fleet, [[0], [], [1]], [500, 100], vm=1, excluded_hosts=[2]) == 0


def test_a_host_the_vm_would_overload_is_skipped():
    """At 75 % plus 10 % host 0 passes THR 0.8, so the switched-off host 1 takes the VM."""
    fleet = small_fleet([1000, 1000, 1000], [750, 100])
    assert _place(fleet, [[0], [], [1]], [750, 100], vm=1, excluded_hosts=[2]) == 1


def test_an_empty_host_skips_the_overload_test():
    """CloudSim only tests hosts with something allocated: 90 % onto an empty host is allowed."""
    fleet = small_fleet([1000, 1000], [900])
    assert _place(fleet, [[], [0]], [900], vm=0, excluded_hosts=[1]) == 0


def test_a_core_too_small_for_the_vm_rules_the_host_out():
    """Host 0 has two 500-MIPS cores; a VM asking 600 MIPS on one core goes to host 1."""
    fleet = small_fleet([1000, 2000, 1000], [600], cores=2)
    assert _place(fleet, [[], [], [0]], [600], vm=0, excluded_hosts=[2]) == 1


def test_no_host_qualifies():
    """Every other host is full or excluded: None."""
    fleet = small_fleet([1000, 1000, 1000], [950, 100, 960])
    assert _place(fleet, [[0], [1], [2]], [950, 100, 960], vm=1, excluded_hosts=[1, 2]) is None


def test_a_history_based_detector_is_asked_about_the_cheapest_hosts_first():
    """LR predicts host 0 (rising) past the limit with the VM, so the next cheapest host takes it."""
    fleet = small_fleet([1000, 1000, 1000], [1000, 1000, 50], tables=[FLAT_W, LINEAR_W], kinds=[0, 1, 1])
    rising = [0.3 + 0.06 * x for x in range(10, 0, -1)]  # 0.36 .. 0.90, heading for 0.96
    steady = [0.3] * 10
    history = [rising, steady, [1.0] * 10]
    requested = [rising[0] * 1000, steady[0] * 1000, 50]
    detector = LocalRegressionDetector(1.2)
    # Host 0 is the cheapest (flat power) but its LR forecast with the VM is over 1/1.2.
    assert (
        _place(
            fleet, [[0], [1], [2]], requested, vm=2, excluded_hosts=[2], detector=detector, history=history
        )
        == 1
    )
