"""The policies behind one interface: CloudSim's rounds on tiny fleets, and Fleetvisor's planner."""

from __future__ import annotations

import numpy as np
import pytest

from controller.balancer.evaluation import make_policy, standard_fleet
from controller.balancer.evaluation.detectors import ThresholdDetector
from controller.balancer.evaluation.policy import CloudSimPolicy, UnknownPolicyError
from controller.balancer.planner import FleetvisorPolicy, FleetvisorSettings, MigrationCostModel
from tests.controller.balancer.support import small_fleet, snapshot

THR = CloudSimPolicy("THR-MMT-0.8", ThresholdDetector(0.8))


def test_policies_are_found_by_name_case_insensitively():
    """The registry knows the three baselines and fleetvisor."""
    assert make_policy("thr-mmt-0.8").name == "THR-MMT-0.8"
    assert make_policy("LR-MMT-1.2").name == "LR-MMT-1.2"
    assert make_policy("Fleetvisor").name == "fleetvisor"


def test_an_unknown_policy_name_lists_the_known_ones():
    """The error names the policy and the choices."""
    with pytest.raises(UnknownPolicyError, match=r"'best'.*THR-MMT-0.8.*fleetvisor"):
        make_policy("best")


def test_cloudsim_first_placement_spreads_vms_over_empty_g5_hosts():
    """At creation every host measures 0 %, so each VM lands on the next empty G5 (odd) host."""
    placement = THR.place_initial(standard_fleet(4))
    assert placement.tolist() == [1, 3, 5, 7]


def test_cloudsim_overloaded_host_sheds_its_smallest_ram_vm_until_under_threshold():
    """900 of 1000 MIPS > 80 %: the 613 MB VM leaves (to the cheapest host), 700 MIPS remain."""
    fleet = small_fleet([1000, 1000, 1000], [500, 200, 200, 500], vm_ram_mb=[1740, 613, 870, 1740])
    snap = snapshot(fleet, [[0, 1, 2], [3], []], [500, 200, 200, 500])
    assert THR.plan(snap) == [(1, 1)]


def test_cloudsim_empties_the_least_utilised_host_when_everything_fits():
    """Host 0 at 10 % moves its only VM to host 1 at 50 %."""
    fleet = small_fleet([1000, 1000], [100, 500])
    snap = snapshot(fleet, [[0], [1]], [100, 500])
    assert THR.plan(snap) == [(0, 1)]


def test_cloudsim_underload_moves_are_all_or_nothing():
    """Host 1 can take only one of host 0's two VMs under THR 0.8, so neither moves."""
    fleet = small_fleet([1000, 1000], [300, 300, 500])
    snap = snapshot(fleet, [[0, 1], [2]], [300, 300, 500])
    assert THR.plan(snap) == []


def _fleetvisor(**settings: object) -> FleetvisorPolicy:
    return FleetvisorPolicy(FleetvisorSettings(**settings))  # type: ignore[arg-type]


def test_fleetvisor_relieves_an_overloaded_host_with_the_cheapest_sufficient_vm():
    """1100 of 1000 MIPS: the small-RAM 300-MIPS VM alone brings it under 90 %, so it goes."""
    fleet = small_fleet([1000, 1000, 1000], [500, 300, 300, 100], vm_ram_mb=[1740, 1740, 613, 613])
    snap = snapshot(fleet, [[0, 1, 2], [3], []], [500, 300, 300, 100])
    migrations = _fleetvisor(underload_utilization=0.0).plan(snap)
    assert migrations == [(2, 1)]


def test_fleetvisor_wakes_a_host_only_when_no_active_host_fits():
    """Host 1 is nearly full, so the VM relieving host 0 wakes switched-off host 2."""
    fleet = small_fleet([1000, 1000, 1000], [600, 500, 850])
    snap = snapshot(fleet, [[0, 1], [2], []], [600, 500, 850])
    migrations = _fleetvisor(underload_utilization=0.0).plan(snap)
    assert migrations == [(1, 2)]


def test_fleetvisor_empties_an_underloaded_host_when_its_vms_fit_elsewhere():
    """Host 0 at 20 % joins host 1 at 60 %: one migration, one host fewer."""
    fleet = small_fleet([1000, 1000], [1000, 1000])
    snap = snapshot(fleet, [[0], [1]], [200, 600], history=[[0.2] * 6, [0.6] * 6])
    assert _fleetvisor().plan(snap) == [(0, 1)]


def test_fleetvisor_keeps_hosts_inside_the_hysteresis_band():
    """Hosts at 55 % and 30 % with a 50 % low edge: only the 30 % host is a candidate, and it fits."""
    fleet = small_fleet([1000, 1000], [1000, 1000])
    snap = snapshot(fleet, [[0], [1]], [550, 300], history=[[0.55] * 6, [0.3] * 6])
    assert _fleetvisor().plan(snap) == [(1, 0)]
    snap = snapshot(fleet, [[0], [1]], [550, 300], history=[[0.55] * 6, [0.3] * 6])
    assert _fleetvisor(underload_utilization=0.25).plan(snap) == []


def test_fleetvisor_respects_headroom_on_the_combined_history():
    """Two VMs peaking at the same time do not pack; the same loads peaking apart do."""
    fleet = small_fleet([1000, 1000], [1000, 1000])
    together = [[0.2, 0.6, 0.2, 0.6, 0.2, 0.6], [0.2, 0.6, 0.2, 0.6, 0.2, 0.6]]
    apart = [[0.2, 0.6, 0.2, 0.6, 0.2, 0.6], [0.6, 0.2, 0.6, 0.2, 0.6, 0.2]]
    snap = snapshot(fleet, [[0], [1]], [200, 200], history=together)
    assert _fleetvisor(z=0.0).plan(snap) == []
    snap = snapshot(fleet, [[0], [1]], [200, 600], history=apart)
    assert _fleetvisor(z=0.0).plan(snap) == [(0, 1)]


def test_fleetvisor_consolidates_only_when_the_saving_pays_for_the_move():
    """With a one-second horizon the idle watts saved do not cover a 10 s migration's price."""
    fleet = small_fleet([1000, 1000], [1000, 1000])
    history = [[0.2] * 6, [0.6] * 6]
    assert _fleetvisor(horizon_s=1.0).plan(snapshot(fleet, [[0], [1]], [200, 600], history=history)) == []


def test_fleetvisor_leaves_a_vm_alone_during_its_cooldown():
    """A VM moved at step 1 is not consolidated again at step 2, but is after the cooldown."""
    fleet = small_fleet([1000, 1000], [1000, 1000])
    history = [[0.2] * 6, [0.6] * 6]
    policy = _fleetvisor(cooldown_intervals=3)
    assert policy.plan(snapshot(fleet, [[0], [1]], [200, 600], history=history, step=1)) == [(0, 1)]
    # Had the move not happened, the same situation one step later: the VM is still cooling down.
    assert policy.plan(snapshot(fleet, [[0], [1]], [200, 600], history=history, step=2)) == []
    assert policy.plan(snapshot(fleet, [[0], [1]], [200, 600], history=history, step=4)) == [(0, 1)]


def test_fleetvisor_first_placement_respects_ram_network_and_core_size():
    """Every host holds <= 4096 MB and <= 10 VMs, and no 2500-MIPS VM sits on a 1860-MIPS core."""
    fleet = standard_fleet(1000)
    placement = FleetvisorPolicy().place_initial(fleet)
    ram = np.bincount(placement, weights=fleet.vm_ram_mb, minlength=fleet.hosts)
    count = np.bincount(placement, minlength=fleet.hosts)
    assert ram.max() <= 4096 and count.max() <= 10
    assert (fleet.host_core_mips[placement] >= fleet.vm_mips).all()


def test_migration_cost_counts_time_and_lost_cpu():
    """1250 MB at 62.5 MB/s is 20 s; losing 10 % of 500 MIPS for 20 s is 1000 MIPS s."""
    cost = MigrationCostModel(sla_price_w=60.0, cpu_price_w_per_mips=1.0)
    assert float(cost.seconds(1250.0)) == pytest.approx(20.0)
    assert float(cost.lost_mips_s(1250.0, 500.0)) == pytest.approx(1000.0)
    assert float(cost.price_j(1250.0, 500.0)) == pytest.approx(60.0 * 20.0 + 1000.0)
