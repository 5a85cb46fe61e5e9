"""PowerWeigher: hosts that are on, loaded nearest their efficient target."""

from __future__ import annotations

from controller.scheduler import (
    CapacitySettings,
    PlacementRequest,
    PowerSettings,
    Scheduler,
    SchedulerSettings,
)
from controller.scheduler.weighers import PowerWeigher
from controller.state.store import Usage
from tests.controller.scheduler.support import assert_weigher_agrees, fleet, record, request, view

CAP = CapacitySettings(cpu_allocation_ratio=1.0, reserved_host_memory_mib=0)


def test_prefers_the_load_nearest_the_target():
    """With a 0.7 target, a host that ends at 0.75 beats one that ends at 0.25 and one at 1.0."""
    w = PowerWeigher(PowerSettings(target_utilisation=0.7), CAP)
    vm = request(vcpus=1, memory_mib=1024)

    def host(used: int) -> float:
        return w.weigh_host(view(cores=8, memory_mib=4096, usage=Usage(memory_mib=used, vms=1)), vm)

    assert host(2048) > host(0) and host(2048) > host(3072)


def test_a_powered_off_host_always_loses_to_one_that_is_on():
    """Waking a host costs more than any difference in load."""
    w = PowerWeigher(PowerSettings(), CAP)
    vm = request(memory_mib=1024)
    off_ideal = view(memory_mib=4096, powered_on=False, usage=Usage(memory_mib=1843, vms=1))
    on_empty = view(memory_mib=65536)
    assert w.weigh_host(on_empty, vm) > w.weigh_host(off_ideal, vm)


def test_vector_form_agrees():
    """Weigh equals weigh_host on every host, powered on or not."""
    state = fleet(record("a", memory_mib=8192), record("b", memory_mib=16384), record("c"), capacity=CAP)
    state.claim(0, PlacementRequest(vm="x", memory_mib=5000))
    state.set_powered_on("c", False)
    assert_weigher_agrees(PowerWeigher(PowerSettings(), CAP), state, request(memory_mib=1024))


def test_power_saving_policy_uses_awake_hosts_when_it_may_wake_others():
    """With waking allowed, power-saving still picks the host that is on."""
    settings = SchedulerSettings(
        capacity=CAP, power=PowerSettings(wake_powered_off_hosts=True), default_policy="power-saving"
    )
    state = fleet(record("off"), record("on"), capacity=CAP)
    state.set_powered_on("off", False)
    assert Scheduler(state, settings).select(request(memory_mib=1024)).host_id == "on"
