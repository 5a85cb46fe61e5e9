"""FreeMemoryWeigher and FreeCpuWeigher: raw free capacity; the multiplier's sign packs or spreads."""

from __future__ import annotations

from controller.scheduler import CapacitySettings, PlacementRequest, Scheduler, SchedulerSettings
from controller.scheduler.weighers import FreeCpuWeigher, FreeMemoryWeigher
from controller.state.store import Usage
from tests.controller.scheduler.support import assert_weigher_agrees, fleet, record, request, view


def test_raw_weights_are_free_capacity_after_overcommit_and_reserves():
    """Free memory subtracts the reserve and claims; free vCPUs apply the ratio."""
    capacity = CapacitySettings(cpu_allocation_ratio=2.0, reserved_host_memory_mib=512)
    host = view(cores=4, memory_mib=8192, usage=Usage(vcpus=3, memory_mib=1024, vms=1))
    assert FreeMemoryWeigher(capacity).weigh_host(host, request()) == 8192 - 512 - 1024
    assert FreeCpuWeigher(capacity).weigh_host(host, request()) == 8 - 3


def test_vector_forms_agree_under_the_states_and_other_settings():
    """Weigh equals weigh_host per host, with the state's settings and with others."""
    state = fleet(record("a", cores=2, memory_mib=4096), record("b", cores=16, memory_mib=65536))
    state.claim(0, PlacementRequest(vm="x", vcpus=3, memory_mib=1000))
    for capacity in (
        CapacitySettings(),
        CapacitySettings(cpu_allocation_ratio=1.0, reserved_host_memory_mib=0),
    ):
        assert_weigher_agrees(FreeMemoryWeigher(capacity), state, request())
        assert_weigher_agrees(FreeCpuWeigher(capacity), state, request())


def test_sign_of_the_multiplier_chooses_spread_or_pack():
    """With +1 the emptiest host wins (spread); with -1 the fullest that fits (best fit)."""
    state = fleet(record("small", memory_mib=4096), record("big", memory_mib=65536))
    spread = {"spread": {"free_memory": 1.0}, "fit": {"free_memory": -1.0}}
    scheduler = Scheduler(state, SchedulerSettings(policies=spread, default_policy="spread"))
    assert scheduler.select(request(memory_mib=1024)).host_id == "big"
    assert scheduler.select(request(memory_mib=1024, policy="fit")).host_id == "small"
