"""The SQLite store, on a real file: durability, atomic transactions, schema versions."""

from __future__ import annotations

import sqlite3

import pytest

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
