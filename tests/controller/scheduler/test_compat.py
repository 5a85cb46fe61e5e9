"""The drop-in place(): the first placement's tests, run against the new scheduler."""

from __future__ import annotations

from collections import Counter

from controller.scheduler import (
    CapacitySettings,
    NoValidHost,
    Placement,
    SchedulerSettings,
    SchedulingHints,
    free_capacity,
    place,
)
from controller.store import Usage
from protocols.vmspec import VmSpec
from tests.controller.scheduler.support import record

BEST_FIT = SchedulerSettings(default_policy="best-fit")


def _host(host_id: str, *, online: bool = True, maintenance: bool = False, **caps: object):  # type: ignore[no-untyped-def]
    return record(
        host_id, online=online, maintenance=maintenance, accel="sim", engine="sim", disk_gib=0, **caps
    )


def test_best_fit_policy_picks_the_host_left_with_the_least_memory():
    """Under best-fit (the first placement's rule) the snuggest host wins; pack opens the largest."""
    hosts = [_host("big", memory_mib=65536), _host("snug", memory_mib=4096), _host("mid", memory_mib=16384)]
    chosen = place(VmSpec(name="a", memory_mib=3000), hosts, {}, BEST_FIT)
    assert isinstance(chosen, Placement) and chosen.host_id == "snug"
    packed = place(VmSpec(name="a", memory_mib=3000), hosts, {}, SchedulerSettings())
    assert isinstance(packed, Placement) and packed.host_id == "big"


def test_claims_count_against_capacity():
    """Memory already claimed on a host is not offered again."""
    hosts = [_host("h1", memory_mib=4096 + 512), _host("h2", memory_mib=8192 + 512)]
    usage = {"h1": Usage(vcpus=1, memory_mib=4096, vms=1)}
    chosen = place(VmSpec(name="a", memory_mib=1024), hosts, usage, BEST_FIT)
    assert isinstance(chosen, Placement) and chosen.host_id == "h2"


def test_vcpu_overcommit_ratio_is_respected():
    """A host with 2 cores at ratio 4.0 offers 8 vCPUs and refuses a 9th."""
    settings = SchedulerSettings(capacity=CapacitySettings(cpu_allocation_ratio=4.0))
    hosts = [_host("h1", cores=2)]
    assert isinstance(place(VmSpec(name="a", vcpus=8), hosts, {}, settings), Placement)
    refused = place(VmSpec(name="a", vcpus=9), hosts, {}, settings)
    assert isinstance(refused, NoValidHost) and refused.rejected == {"vcpus": 1}


def test_refusal_counts_every_reason_and_suggests_the_largest_free_memory():
    """The first placement's refusal text, word for word where its tests look."""
    hosts = [
        _host("full-1", memory_mib=2048),
        _host("full-2", memory_mib=2048),
        _host("down", online=False),
        _host("maint", maintenance=True),
        _host("arm", arch="aarch64"),
    ]
    refused = place(VmSpec(name="web-1", memory_mib=8192), hosts, {})
    assert isinstance(refused, NoValidHost)
    assert Counter(refused.rejected) == Counter({"memory": 2, "offline": 1, "maintenance": 1, "arch": 1})
    assert refused.reason.startswith("no host can take vm 'web-1' (1 vCPU, 8.0 GiB RAM): 2 hosts lack memory")
    assert "1 offline" in refused.reason and "1 in maintenance" in refused.reason
    assert "cannot run x86_64 guests" in refused.reason
    assert "1.5 GiB" in refused.reason


def test_empty_fleet_refusal_says_how_to_add_a_host():
    """With no hosts at all, the refusal says to start an agent."""
    refused = place(VmSpec(name="a"), [], {})
    assert isinstance(refused, NoValidHost) and "fleetvisor agent" in refused.reason


def test_two_full_hosts_read_as_in_the_controllers_overbooking_test():
    """Two 4 GiB hosts holding 7 VMs each: the 15th refusal says '2 hosts lack memory'."""
    hosts = [_host("h1", memory_mib=4096), _host("h2", memory_mib=4096)]
    usage = {h: Usage(vcpus=7, memory_mib=7 * 512, vms=7) for h in ("h1", "h2")}
    refused = place(VmSpec(name="vm-015", memory_mib=512), hosts, usage)
    assert isinstance(refused, NoValidHost) and "2 hosts lack memory" in refused.message


def test_hints_and_labels_reach_the_filters():
    """place() takes scheduling hints and host labels too."""
    hosts = [_host("h1"), _host("h2")]
    chosen = place(
        VmSpec(name="a"),
        hosts,
        {},
        hints=SchedulingHints(require={"zone": "b"}),
        labels={"h2": {"zone": "b"}},
    )
    assert isinstance(chosen, Placement) and chosen.host_id == "h2"


def test_free_capacity_matches_the_first_placements():
    """free_capacity returns (vCPUs, MiB, GiB) free after claims, as views.py expects."""
    assert free_capacity(
        _host("h1", cores=2, memory_mib=4096), Usage(vcpus=1, memory_mib=1024), CapacitySettings()
    ) == (
        7,
        4096 - 512 - 1024,
        0,
    )
