"""CapacityFilter: free vCPUs, memory and disk after overcommit ratios and host reserves."""

from __future__ import annotations

from controller.scheduler import CapacitySettings, PlacementRequest
from controller.scheduler.filters import CapacityFilter
from controller.state.store import Usage
from tests.controller.scheduler.support import assert_filter_agrees, fleet, record, request, view


def test_memory_must_fit_after_the_host_reserve():
    """A 4096 MiB host with 512 MiB reserved takes 3584 MiB and refuses 3585."""
    f = CapacityFilter(CapacitySettings(reserved_host_memory_mib=512))
    host = view(memory_mib=4096)
    assert f.host_passes(host, request(memory_mib=3584))
    assert not f.host_passes(host, request(memory_mib=3585))
    assert f.reason(host, request(memory_mib=3585)) == "memory"


def test_vcpu_overcommit_ratio_and_reserved_cores():
    """2 cores at ratio 4.0 offer 8 vCPUs; reserving a core leaves 4."""
    assert CapacityFilter(CapacitySettings(cpu_allocation_ratio=4.0)).host_passes(
        view(cores=2), request(vcpus=8)
    )
    assert not CapacityFilter(CapacitySettings(cpu_allocation_ratio=4.0)).host_passes(
        view(cores=2), request(vcpus=9)
    )
    reserved = CapacityFilter(CapacitySettings(cpu_allocation_ratio=4.0, reserved_host_cpus=1))
    assert reserved.host_passes(view(cores=2), request(vcpus=4))
    assert reserved.reason(view(cores=2), request(vcpus=5)) == "vcpus"


def test_claims_count_against_capacity_and_disk_is_checked():
    """Claimed memory, vCPUs and disk are not offered again; disk is its own reason."""
    f = CapacityFilter(CapacitySettings(reserved_host_memory_mib=0))
    host = view(memory_mib=8192, disk_gib=100, usage=Usage(vcpus=1, memory_mib=6144, disk_gib=90, vms=1))
    assert f.reason(host, request(memory_mib=4096)) == "memory"
    assert f.reason(host, request(memory_mib=1024, disk_gib=20)) == "disk"
    assert f.host_passes(host, request(memory_mib=2048, disk_gib=10))


def test_memory_overcommit_ratio():
    """A ram ratio of 1.5 offers half as much memory again."""
    f = CapacityFilter(CapacitySettings(ram_allocation_ratio=1.5, reserved_host_memory_mib=0))
    assert f.host_passes(view(memory_mib=4096), request(memory_mib=6144))
    assert not f.host_passes(view(memory_mib=4096), request(memory_mib=6145))


def test_mask_and_reasons_agree_with_host_passes_under_other_settings_than_the_state():
    """The vector form agrees with host_passes both on the state's settings and on different ones."""
    state = fleet(
        record("small", cores=2, memory_mib=2048),
        record("mid", cores=4, memory_mib=8192, disk_gib=10),
        record("big", cores=16, memory_mib=65536),
    )
    state.claim(1, PlacementRequest(vm="x", vcpus=6, memory_mib=1024))
    for f in (
        CapacityFilter(),
        CapacityFilter(CapacitySettings(cpu_allocation_ratio=1.0, reserved_host_cpus=1)),
    ):
        for req in (request(vcpus=4, memory_mib=4096), request(vcpus=1, memory_mib=512, disk_gib=20)):
            assert_filter_agrees(f, state, req)


def test_refusal_words():
    """Reasons read as '1 host lacks memory' and '2 hosts lack vCPUs'."""
    f = CapacityFilter()
    assert f.phrase("memory", 1, request()) == "1 host lacks memory"
    assert f.phrase("vcpus", 2, request()) == "2 hosts lack vCPUs"
