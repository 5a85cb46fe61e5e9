"""The SQLite store, on a real file: durability, atomic transactions, schema versions."""

from __future__ import annotations

import sqlite3

import pytest

from controller.state.schema import SCHEMA_VERSION
from controller.state.store import HostRecord, Store, StoreError, Usage
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


def test_a_version_1_store_is_migrated_in_place_and_keeps_its_data(tmp_path):
    """Opening a schema-1 file adds the label, migration, standby, hints and fencing columns and the
    energy and group tables, keeps every row, records version 6.
    """
    path = tmp_path / "old.sqlite"
    store = Store(path)
    store.upsert_host(
        host_id="h1",
        online=True,
        boot_id="b",
        address="a",
        agent_version="1",
        capabilities=_caps(),
        reason="r",
    )
    store.close()
    with sqlite3.connect(path) as raw:  # turn it back into a version-1 file
        raw.execute(
            "CREATE TABLE hosts_v1 AS SELECT host_id, online, boot_id, address, agent_version, "
            "capabilities, maintenance, state_reason, first_seen, last_seen FROM hosts"
        )
        raw.execute("DROP TABLE hosts")
        raw.execute("ALTER TABLE hosts_v1 RENAME TO hosts")
        raw.execute("ALTER TABLE vms DROP COLUMN migrating_to")
        raw.execute("ALTER TABLE vms DROP COLUMN hints")
        raw.execute("DROP TABLE energy")
        raw.execute("DROP TABLE groups")
        raw.execute("DROP TABLE enrolment")
        raw.execute("DROP TABLE join_tokens")
        raw.execute("DROP INDEX ops_parent")
        raw.execute("ALTER TABLE operations DROP COLUMN parent")
        raw.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    migrated = Store(path)
    host = migrated.host("h1")
    assert host is not None and host.labels == {} and host.capabilities == _caps()
    migrated.set_host_admin("h1", operator_labels={"zone": "a"})
    assert migrated.host("h1").labels == {"zone": "a"}  # type: ignore[union-attr]
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
            SCHEMA_VERSION
        )
    migrated.insert_vm(VmSpec(name="v", memory_mib=256), "h1", "running", None)
    migrated.update_vm("v", migrating_to="h1")
    assert migrated.vm("v").migrating_to == "h1"  # type: ignore[union-attr]
    assert migrated.host("h1").standby_since is None  # type: ignore[union-attr]
    assert migrated.insert_operation(kind="stop", vm="v", host_id="h1", params={}, deadline=0).parent == ""
    with migrated.parent("p-1"):
        child = migrated.insert_operation(kind="stop", vm="v", host_id="h1", params={}, deadline=0)
    assert [c.op_id for c in migrated.children("p-1")] == [child.op_id]
    migrated.set_host_standby("h1", 1234.5)
    assert migrated.host("h1").standby_since == 1234.5  # type: ignore[union-attr]
    assert migrated.energy() == {}
    migrated.save_energy({"h1": {"model": 3600.0}})
    migrated.save_energy({"h1": {"model": 7200.0, "measured": 10.0}})
    saved = migrated.energy()["h1"]
    assert saved.joules == {"model": 7200.0, "measured": 10.0} and saved.since > 0
    assert migrated.vm("v").hints == {}  # type: ignore[union-attr]
    migrated.insert_vm(VmSpec(name="w", memory_mib=256), "h1", "running", None, {"hosts": ["h1"]})
    assert migrated.vm("w").hints == {"hosts": ["h1"]}  # type: ignore[union-attr]
    assert migrated.group_policy("g") is None
    migrated.insert_group("g", "affinity")
    assert migrated.group_policy("g") == "affinity"
    migrated.set_host_fenced("h1", 99.0, "confirmed down by an operator")
    fenced = migrated.host("h1")
    assert fenced is not None and fenced.fenced_at == 99.0 and fenced.fenced_how.startswith("confirmed")
