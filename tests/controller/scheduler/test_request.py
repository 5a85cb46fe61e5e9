"""PlacementRequest and SchedulingHints: what the API accepts and what the scheduler reads."""

from __future__ import annotations

import msgspec
import pytest

from controller.scheduler import PlacementRequest, SchedulingHints
from protocols.vmspec import VmSpec, VmWorkload


def test_from_spec_takes_resources_from_the_spec_and_constraints_from_the_hints():
    """Spec gives resources, arch and dirty rate; hints give group, labels, hosts and features."""
    spec = VmSpec(
        name="web-1",
        vcpus=2,
        memory_mib=2048,
        disk_gib=10,
        arch="aarch64",
        workload=VmWorkload(dirty_mib_s=7),
    )
    hints = SchedulingHints(
        group="web",
        require={"zone": "a"},
        hosts=["h1", "h2"],
        avoid_hosts=["h3"],
        required_features=["vmx", "aes", "vmx"],
        accel="kvm",
        policy="spread",
    )
    req = PlacementRequest.from_spec(spec, hints)
    assert (req.vm, req.vcpus, req.memory_mib, req.disk_gib, req.arch, req.dirty_mib_s) == (
        "web-1",
        2,
        2048,
        10,
        "aarch64",
        7.0,
    )
    assert req.group_policy == "anti-affinity", "a named group keeps its members apart by default"
    assert req.required_features == ("aes", "vmx") and req.require_labels == {"zone": "a"}
    assert (req.hosts, req.avoid_hosts, req.accel, req.policy) == (("h1", "h2"), ("h3",), "kvm", "spread")
    assert PlacementRequest.from_spec(spec).group is None


def test_hints_refuse_unknown_fields_and_contradictions():
    """A misspelt hint, a policy without a group and a host both required and avoided are errors."""
    decode = msgspec.json.Decoder(SchedulingHints)
    with pytest.raises(msgspec.ValidationError, match="unknown field `gruop`"):
        decode.decode(b'{"gruop": "web"}')
    with pytest.raises(msgspec.ValidationError, match="needs a group"):
        decode.decode(b'{"group_policy": "affinity"}')
    with pytest.raises(msgspec.ValidationError, match="both required and avoided"):
        decode.decode(b'{"hosts": ["h1"], "avoid_hosts": ["h1"]}')
    with pytest.raises(msgspec.ValidationError, match="group_policy"):
        decode.decode(b'{"group": "g", "group_policy": "together"}')
    ok = decode.decode(b'{"group": "db", "group_policy": "affinity", "require": {"zone": "a"}}')
    assert ok.group_policy == "affinity"


def test_migration_requests_carry_the_source_and_the_measured_dirty_rate():
    """for_migration names the source host and prefers a measured dirty rate over the spec's."""
    req = PlacementRequest.for_migration(VmSpec(name="m", memory_mib=4096), "h1", dirty_mib_s=120.0)
    assert (req.source_host, req.dirty_mib_s, req.memory_mib) == ("h1", 120.0, 4096)


def test_describe_reads_like_the_first_placement():
    """'1 vCPU, 8.0 GiB RAM' and disk when asked for."""
    assert PlacementRequest(vm="a", memory_mib=8192).describe() == "1 vCPU, 8.0 GiB RAM"
    assert (
        PlacementRequest(vm="a", vcpus=2, memory_mib=512, disk_gib=5).describe()
        == "2 vCPU, 512 MiB RAM, 5 GiB disk"
    )
