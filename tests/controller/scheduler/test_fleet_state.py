"""FleetState: per-host columns built from the store's records and kept in step in O(1) per change."""

from __future__ import annotations

import pytest

from controller.scheduler import (
    GROUP_LABEL,
    CapacitySettings,
    FleetState,
    FleetStateError,
    HostView,
    OverbookError,
    PlacementRequest,
)
from controller.state.store import Store, Usage
from protocols.vmspec import VmSpec
from tests.controller.scheduler.support import caps, record


def test_from_records_matches_the_per_host_views():
    """Every host's view from the arrays equals the view built straight from its record and usage."""
    records = [record("h1", cores=4, memory_mib=8192, cpu_features=["vmx"]), record("h2", maintenance=True)]
    usage = {"h1": Usage(vcpus=2, memory_mib=1024, disk_gib=5, vms=1)}
    labels = {"h1": {"zone": "a"}}
    state = FleetState.from_records(records, usage, labels)
    for r in records:
        expected = HostView.from_record(r, usage.get(r.host_id), labels=labels.get(r.host_id, {}))
        assert state.host(r.host_id) == expected
    capacity = CapacitySettings()
    assert int(state.free_memory_mib[0]) == state.host(0).free_memory_mib(capacity) == 8192 - 512 - 1024
    assert int(state.free_vcpus[0]) == 4 * 4 - 2


def test_claims_and_releases_update_usage_and_groups_and_refuse_to_overbook():
    """Claim adds, release subtracts (idempotently), and a claim past free capacity is refused."""
    state = FleetState.from_records([record("h1", memory_mib=4096 + 512)], {})
    req = PlacementRequest(vm="a", vcpus=2, memory_mib=3000, group="g", group_policy="anti-affinity")
    claim = state.claim(0, req)
    assert (claim.host_id, int(state.free_memory_mib[0]), int(state.vms[0])) == ("h1", 1096, 1)
    assert state.group_hosts("g") == {0: 1} and state.group_size("g") == 1
    with pytest.raises(OverbookError, match="vm 'b'"):
        state.claim(0, PlacementRequest(vm="b", memory_mib=2000))
    with pytest.raises(FleetStateError, match="already holds"):
        state.claim(0, req)
    assert state.release("a") == [claim]
    assert state.release("a") == []
    assert int(state.free_memory_mib[0]) == 4096 and state.group_size("g") == 0 and int(state.vms[0]) == 0


def test_a_migrating_vm_holds_a_claim_on_both_hosts():
    """Claiming the target keeps the source claim; releasing by host frees only that end."""
    state = FleetState.from_records([record("src"), record("dst")], {})
    req = PlacementRequest(vm="m", memory_mib=1024)
    state.claim(0, req)
    state.claim(1, req)
    assert [c.host_id for c in state.claims("m")] == ["src", "dst"]
    state.release("m", "src")
    assert [c.host_id for c in state.claims("m")] == ["dst"]
    assert int(state.used_memory_mib[0]) == 0 and int(state.used_memory_mib[1]) == 1024


def test_hosts_join_change_and_leave_without_moving_slots():
    """A new host gets the next slot; an inventory change keeps claims; a host that leaves is a tombstone."""
    state = FleetState.from_records([record("h1")], {})
    state.claim(0, PlacementRequest(vm="a", memory_mib=1024))
    version = state.static_version
    assert state.upsert_host(record("h2")) == 1 and state.static_version > version
    version = state.static_version
    state.upsert_host(record("h1"))
    assert state.static_version == version, "an unchanged inventory must not invalidate caches"
    state.upsert_host(record("h1", memory_mib=32768))
    assert int(state.free_memory_mib[0]) == 32768 - 512 - 1024 and state.static_version > version
    state.remove_host("h1")
    assert state.host_count == 1 and not state.present[0]
    with pytest.raises(FleetStateError, match="'h1'"):
        state.index_of("h1")
    state.upsert_host(record("h1"))
    assert state.index_of("h1") == 0 and int(state.used_memory_mib[0]) == 1024


def test_columns_grow_as_hosts_join_one_at_a_time():
    """Hundreds of joins keep every column the same length and every host addressable."""
    state = FleetState()
    for i in range(300):
        state.upsert_host(record(f"h{i}", cpu_features=[f"f{i % 70}"]), {"rack": f"r{i % 7}"})
    assert (
        state.size == 300 and len(state.present) >= 300 and state.feature_bits.shape[0] == len(state.present)
    )
    assert state.host("h299").labels == {"rack": "r5"} and state.host("h299").cpu_features == {"f19"}


def test_from_records_reads_vms_and_their_groups_so_they_can_be_released(tmp_path):
    """Built from a real store: usage totals, VM claims by name and groups from the spec label."""
    store = Store(tmp_path / "c.sqlite")
    store.upsert_host(
        host_id="h1",
        online=True,
        boot_id="b",
        address="a",
        agent_version="1",
        capabilities=caps(),
        reason="hello",
    )
    store.insert_vm(
        VmSpec(name="a", vcpus=2, memory_mib=1024, labels={GROUP_LABEL: "web"}), "h1", "running", None
    )
    store.insert_vm(VmSpec(name="b", memory_mib=512), "h1", "running", None)
    state = FleetState.from_records(store.hosts(), store.usage(), vms=store.vms())
    assert int(state.used_memory_mib[0]) == 1536 and state.group_hosts("web") == {0: 1}
    state.release("a")
    assert int(state.used_memory_mib[0]) == 512 and state.group_size("web") == 0
    store.close()


def test_set_usage_resyncs_totals_from_the_store():
    """set_usage overwrites a host's claimed totals with the store's."""
    state = FleetState.from_records([record("h1")], {})
    state.set_usage("h1", Usage(vcpus=3, memory_mib=2048, disk_gib=1, vms=2))
    assert (int(state.used_vcpus[0]), int(state.free_memory_mib[0]), int(state.vms[0])) == (
        3,
        16384 - 512 - 2048,
        2,
    )


def test_adopting_what_a_host_runs_may_exceed_its_capacity():
    """Reconciliation records what a host reports even past its limits; claims then refuse that host."""
    state = FleetState.from_records([record("h1", memory_mib=2048)], {})
    state.adopt("big", "h1", 1, 4096)
    assert int(state.free_memory_mib[0]) < 0 and not state.fits(0, 1, 16, 0)


def test_resync_repairs_drift_from_the_store():
    """Resync sets every host's totals to the store's and names the hosts that differed."""
    state = FleetState.from_records([record("h1"), record("h2")], {})
    state.claim(0, PlacementRequest(vm="a", memory_mib=1024))
    drifted = state.resync({"h2": Usage(vcpus=1, memory_mib=512, vms=1)})
    assert sorted(drifted) == ["h1", "h2"]
    assert state.usage("h1") == Usage() and state.usage("h2") == Usage(vcpus=1, memory_mib=512, vms=1)
    assert state.resync({"h2": Usage(vcpus=1, memory_mib=512, vms=1)}) == []
