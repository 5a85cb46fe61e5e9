"""BalanceWeigher: prefer hosts whose CPU and memory shares stay close after placement."""

from __future__ import annotations

from controller.scheduler import CapacitySettings, PlacementRequest
from controller.scheduler.weighers import BalanceWeigher
from controller.state.store import Usage
from tests.controller.scheduler.support import assert_weigher_agrees, fleet, record, request, view

CAP = CapacitySettings(cpu_allocation_ratio=1.0, reserved_host_memory_mib=0)


def test_raw_weight_is_minus_the_gap_between_cpu_and_memory_shares():
    """A CPU-heavy VM suits a host whose memory is the busier resource."""
    w = BalanceWeigher(CAP)
    memory_busy = view(cores=8, memory_mib=8192, usage=Usage(vcpus=0, memory_mib=4096, vms=1))
    cpu_busy = view(cores=8, memory_mib=8192, usage=Usage(vcpus=4, memory_mib=0, vms=1))
    vm = request(vcpus=4, memory_mib=512)
    assert w.weigh_host(memory_busy, vm) > w.weigh_host(cpu_busy, vm)
    assert w.weigh_host(memory_busy, vm) == -abs(4 / 8 - 4608 / 8192)


def test_vector_form_agrees():
    """Weigh equals weigh_host on every host."""
    state = fleet(record("a", cores=8, memory_mib=8192), record("b", cores=4, memory_mib=16384), capacity=CAP)
    state.claim(0, PlacementRequest(vm="x", vcpus=2, memory_mib=6000))
    assert_weigher_agrees(BalanceWeigher(CAP), state, request(vcpus=2, memory_mib=1024))
    assert_weigher_agrees(BalanceWeigher(), state, request(vcpus=2, memory_mib=1024))
