"""The SQLite store (a real file) and the first best-fit placement with its explanations."""

from __future__ import annotations

import sqlite3
from collections import Counter

import pytest

from controller import placement
from controller.store import HostRecord, Store, StoreError, Usage
from protocols.messages import Capabilities
from protocols.vmspec import VmSpec


def _caps(cores: int = 8, memory_mib: int = 16384, arch: str = "x86_64") -> Capabilities:
    return Capabilities(
        engine="sim", arch=arch, accel="sim", cores=cores, memory_mib=memory_mib, guest_arches=[arch]
    )


def _host(host_id: str, *, online: bool = True, maintenance: bool = False, **caps: int) -> HostRecord:
    return HostRecord(
        host_id=host_id,
        online=online,
        boot_id="b",
        address="127.0.0.1",
        agent_version="t",
        capabilities=_caps(**caps),  # type: ignore[arg-type]
        maintenance=maintenance,
        state_reason="",
        first_seen=0.0,
        last_seen=0.0,
    )


def test_store_keeps_hosts_vms_operations_and_events_across_reopen(tmp_path):
    """Everything written before close is there after reopening the same SQLite file."""
    path = tmp_path / "c.sqlite"
    store = Store(path)
    store.upsert_host(
        host_id="h1",
        online=True,
        boot_id="b1",
        address="10.0.0.1",
        agent_version="1",
        capabilities=_caps(),
        reason="hello",
    )
    op = store.insert_operation(kind="create", vm="a", host_id="h1", params={"start": True}, deadline=1e12)
    store.insert_vm(VmSpec(name="a", vcpus=2, memory_mib=1024), "h1", "creating", op.op_id)
    store.append_event("vm.creating", "vm a placed on h1", vm="a")
    store.close()

    again = Store(path)
    assert again.host("h1") is not None and again.host("h1").capabilities == _caps()  # type: ignore[union-attr]
    vm = again.vm("a")
    assert vm is not None and vm.host_id == "h1" and vm.spec.vcpus == 2 and vm.op_id == op.op_id
    assert [o.op_id for o in again.running_operations()] == [op.op_id]
    assert again.operation(op.op_id).params == {"start": True}  # type: ignore[union-attr]
    assert [e.message for e in again.events_since(0)] == ["vm a placed on h1"]
    assert again.usage() == {"h1": Usage(vcpus=2, memory_mib=1024, disk_gib=0, vms=1)}
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failed_transaction_leaves_nothing_half_written(tmp_path):
    """An error inside a transaction rolls back the operation and the VM row together."""
    store = Store(tmp_path / "c.sqlite")
    with pytest.raises(RuntimeError), store.transaction():
        store.insert_operation(kind="create", vm="a", host_id="h1", params={}, deadline=1e12)
        store.insert_vm(VmSpec(name="a"), "h1", "creating", None)
        raise RuntimeError("crash between the two writes")
    assert store.vm("a") is None
    assert store.running_operations() == []


def test_store_refuses_a_file_from_another_schema_version(tmp_path):
    """A store written by an incompatible controller is refused with a message naming the file."""
    path = tmp_path / "c.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        Store(path)


def test_best_fit_picks_the_host_left_with_the_least_memory():
    """Among hosts that fit, the one with the least memory left after placement wins."""
    hosts = [_host("big", memory_mib=65536), _host("snug", memory_mib=4096), _host("mid", memory_mib=16384)]
    choice = placement.place(VmSpec(name="a", memory_mib=3000), hosts, {}, placement.PlacementSettings())
    assert isinstance(choice, placement.Placement) and choice.host_id == "snug"


def test_claims_count_against_capacity():
    """Memory already claimed on a host is not offered again."""
    hosts = [_host("h1", memory_mib=4096 + 512), _host("h2", memory_mib=8192 + 512)]
    usage = {"h1": Usage(vcpus=1, memory_mib=4096, vms=1)}
    choice = placement.place(VmSpec(name="a", memory_mib=1024), hosts, usage, placement.PlacementSettings())
    assert isinstance(choice, placement.Placement) and choice.host_id == "h2"


def test_vcpu_overcommit_ratio_is_respected():
    """A host with 2 cores at ratio 4.0 offers 8 vCPUs and refuses a 9th."""
    settings = placement.PlacementSettings(cpu_allocation_ratio=4.0)
    hosts = [_host("h1", cores=2)]
    assert isinstance(placement.place(VmSpec(name="a", vcpus=8), hosts, {}, settings), placement.Placement)
    refused = placement.place(VmSpec(name="a", vcpus=9), hosts, {}, settings)
    assert isinstance(refused, placement.NoValidHost) and refused.rejected == {"vcpus": 1}


def test_refusal_counts_every_reason_and_suggests_the_largest_free_memory():
    """No valid host: the reason counts hosts per cause and names the most free memory."""
    hosts = [
        _host("full-1", memory_mib=2048),
        _host("full-2", memory_mib=2048),
        _host("down", online=False),
        _host("maint", maintenance=True),
        _host("arm", arch="aarch64"),
    ]
    refused = placement.place(VmSpec(name="web-1", memory_mib=8192), hosts, {}, placement.PlacementSettings())
    assert isinstance(refused, placement.NoValidHost)
    assert Counter(refused.rejected) == Counter({"memory": 2, "offline": 1, "maintenance": 1, "arch": 1})
    assert refused.reason.startswith("no host can take vm 'web-1' (1 vCPU, 8.0 GiB RAM): 2 hosts lack memory")
    assert "1 offline" in refused.reason and "1 in maintenance" in refused.reason
    assert "cannot run x86_64 guests" in refused.reason
    assert "1.5 GiB" in refused.reason  # 2048 - 512 reserved


def test_empty_fleet_refusal_says_how_to_add_a_host():
    """With no hosts at all, the refusal says to start an agent."""
    refused = placement.place(VmSpec(name="a"), [], {}, placement.PlacementSettings())
    assert isinstance(refused, placement.NoValidHost) and "fleetvisor agent" in refused.reason
