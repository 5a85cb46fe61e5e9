"""ConsolidationWeigher: fill hosts in use first, open the largest free host last."""

from __future__ import annotations

from controller.scheduler import CapacitySettings, PlacementRequest, Scheduler, SchedulerSettings
from controller.scheduler.weighers import ConsolidationWeigher
from controller.state.store import Usage
from tests.controller.scheduler.support import assert_weigher_agrees, fleet, record, request, view

CAP = CapacitySettings(cpu_allocation_ratio=1.0, reserved_host_memory_mib=0)


def test_hosts_in_use_outrank_empty_ones_and_fuller_is_better():
    """A nearly empty host in use beats any empty host; among hosts in use, the fuller wins."""
    w = ConsolidationWeigher(CAP)
    vm = request(memory_mib=1024)
    light = view(memory_mib=65536, usage=Usage(memory_mib=1024, vms=1))
    heavy = view(memory_mib=8192, usage=Usage(memory_mib=6144, vms=1))
    empty_big, empty_small = view(memory_mib=65536), view(memory_mib=4096)
    assert w.weigh_host(heavy, vm) > w.weigh_host(light, vm) > w.weigh_host(empty_big, vm)
    assert w.weigh_host(empty_big, vm) > w.weigh_host(empty_small, vm)


def test_vector_form_agrees():
    """Weigh equals weigh_host on every host, with the state's settings and others."""
    state = fleet(record("a", memory_mib=8192), record("b", memory_mib=32768), record("c"), capacity=CAP)
    state.claim(0, PlacementRequest(vm="x", vcpus=2, memory_mib=3000))
    assert_weigher_agrees(ConsolidationWeigher(CAP), state, request(vcpus=1, memory_mib=1024))
    assert_weigher_agrees(ConsolidationWeigher(CapacitySettings()), state, request(vcpus=1, memory_mib=1024))


def test_pack_fills_one_host_before_opening_the_next_largest():
    """Under pack, VMs stay on the first (largest) host until it is full, then the next largest opens."""
    state = fleet(
        record("s", memory_mib=4096), record("l", memory_mib=8192), record("m", memory_mib=6144), capacity=CAP
    )
    scheduler = Scheduler(state, SchedulerSettings(capacity=CAP))
    placed = []
    for i in range(4):
        req = request(f"v{i}", memory_mib=3072)
        decision = scheduler.select(req)
        scheduler.claim(decision, req)
        placed.append(decision.host_id)
    assert placed == ["l", "l", "m", "m"]
