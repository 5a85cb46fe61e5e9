"""Reconciliation: make the store agree with what a host reports it runs.

:func:`reconcile` is a function over the store and the event hub. It writes the records and returns
what is left for others to do: the VMs it adopted (the scheduler's claims follow them) and the stale
copies a host still holds of a VM that runs elsewhere (restarted by HA, or migrated), which the
clean-up service removes from the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.state.events import EventHub
from controller.state.store import Store, VmState
from protocols.messages import HostInventory, VmPowerState, VmStatus

#: What a VM's record says while its host reports the VM in each power state.
POWER_TO_VM_STATE: dict[VmPowerState, VmState] = {
    "defined": "stopped",
    "starting": "starting",
    "running": "running",
    "paused": "paused",
    "stopping": "stopping",
    "stopped": "stopped",
    "crashed": "crashed",
    "incoming": "migrating",
}


@dataclass(frozen=True, slots=True)
class StaleCopy:
    """A copy of ``vm`` on ``host_id`` that must go, because ``why``."""

    host_id: str
    vm: str
    why: str


@dataclass(slots=True)
class Reconciled:
    """What one reconciliation changed, and what it leaves to do."""

    host_is_new: bool = False
    #: VMs now recorded on this host that were not before (the scheduler must claim them).
    adopted: list[str] = field(default_factory=list)
    #: VMs whose records were deleted (the scheduler must release their claims).
    deleted: list[str] = field(default_factory=list)
    stale: list[StaleCopy] = field(default_factory=list)


def reconcile(store: Store, events: EventHub, inventory: HostInventory) -> Reconciled:
    """Record ``inventory``'s host and VMs in the store; return the adoptions and stale copies."""
    host_id = inventory.host_id
    done = Reconciled(host_is_new=store.host(host_id) is None)
    with store.transaction():
        store.upsert_host(
            host_id=host_id,
            online=True,
            boot_id=inventory.boot_id,
            address=inventory.address,
            agent_version=inventory.agent_version,
            capabilities=inventory.capabilities,
            reason=f"inventory ({inventory.reason})",
            agent_labels=inventory.labels,
        )
        reported = {vm.name for vm in inventory.vms}
        for status in inventory.vms:
            _reconcile_reported(store, events, host_id, status, done)
        for record in store.vms(host_id):
            if record.name in reported or record.op_id is not None:
                continue
            if _unanswered_delete(store, record.name, host_id):
                store.delete_vm(record.name)
                done.deleted.append(record.name)
                events.emit(
                    "vm.deleted",
                    f"vm {record.name} deleted: its delete went unanswered, and {host_id} no longer has it",
                    host_id=host_id,
                    vm=record.name,
                )
            elif record.state != "missing":
                store.update_vm(record.name, state="missing", error=f"host {host_id} does not report it")
                events.emit(
                    "vm.missing",
                    f"vm {record.name} is recorded on {host_id} but the host does not report it",
                    host_id=host_id,
                    vm=record.name,
                )
    if done.host_is_new:
        caps = inventory.capabilities
        events.emit(
            "host.joined",
            f"host {host_id} joined: {caps.engine}/{caps.accel}, {caps.cores} cores, {caps.memory_mib} MiB",
            host_id=host_id,
        )
    return done


def _unanswered_delete(store: Store, name: str, host_id: str) -> bool:
    """Whether the VM's last operation was a delete on ``host_id`` that failed for want of an answer.

    Such a delete may have been applied (only its reply was lost); a host that no longer has the VM
    says it was.
    """
    last = store.last_operation(name)
    return (
        last is not None
        and last.kind == "delete"
        and last.state == "failed"
        and last.host_id == host_id
        and last.error.startswith("timeout:")
    )


def _reconcile_reported(
    store: Store, events: EventHub, host_id: str, status: VmStatus, done: Reconciled
) -> None:
    record = store.vm(status.name)
    state = POWER_TO_VM_STATE[status.state]
    if record is None:
        store.insert_vm(status.spec, host_id, state, None)
        done.adopted.append(status.name)
        events.emit(
            "vm.adopted", f"vm {status.name} found on {host_id} and adopted", host_id=host_id, vm=status.name
        )
        return
    if record.host_id is None and record.op_id is None:
        store.update_vm(status.name, host_id=host_id, state=state, error="")
        done.adopted.append(status.name)
        events.emit(
            "vm.adopted",
            f"vm {status.name} found on {host_id}; record corrected",
            host_id=host_id,
            vm=status.name,
        )
        return
    if record.host_id != host_id:
        stale = _elsewhere(store, host_id, status.name)
        if stale is not None:
            if stale.why:
                done.stale.append(stale)
            return
        events.emit(
            "vm.conflict",
            f"vm {status.name} is reported by {host_id} but recorded on {record.host_id}",
            host_id=host_id,
            vm=status.name,
        )
        return
    if record.op_id is None and record.state != state:
        store.update_vm(status.name, state=state, error="")
        events.emit(
            "vm.state",
            f"vm {status.name} is {state} on {host_id} (was recorded {record.state})",
            host_id=host_id,
            vm=status.name,
        )


def _elsewhere(store: Store, host_id: str, vm: str) -> StaleCopy | None:
    """Why ``host_id`` may report ``vm`` while the record puts it elsewhere: a stale copy to remove
    (``why`` set), an expected copy to leave alone (``why`` empty), or None for a real conflict.
    """
    record = store.vm(vm)
    assert record is not None
    restart = store.last_operation(vm, "restart")
    if restart is not None and restart.params.get("from_host") == host_id and restart.state != "failed":
        return StaleCopy(host_id, vm, "it was restarted elsewhere")
    if record.migrating_to == host_id:
        return StaleCopy(host_id, vm, "")  # the incoming copy of a migration under way
    if record.op_id is not None and migration_source(store, record.op_id) == host_id:
        return StaleCopy(host_id, vm, "")  # the paused husk a migration is about to clean up
    if migration_leftover(store, host_id, vm):
        return StaleCopy(host_id, vm, f"it migrated and runs on {record.host_id}")
    moved = store.last_operation(vm, "move")
    if moved is not None and moved.state == "succeeded" and moved.params.get("from_host") == host_id:
        return StaleCopy(host_id, vm, f"it was moved (stopped) to {record.host_id}")
    return None


def migration_source(store: Store, op_id: str) -> str | None:
    """The source host of migration ``op_id`` while it runs (None for any other operation)."""
    op = store.operation(op_id)
    if op is None or op.kind != "migrate" or op.state != "running":
        return None
    return str(op.params.get("from_host"))


def migration_leftover(store: Store, host_id: str, vm: str) -> bool:
    """Whether ``host_id`` reporting ``vm`` (recorded elsewhere) is a migration's leftover copy."""
    op = store.last_operation(vm, "migrate")
    if op is None or op.state == "running":
        return False
    p = op.params
    return (op.state == "succeeded" and p.get("from_host") == host_id) or (
        op.state == "failed" and p.get("to_host") == host_id and p.get("phase") == "rollback"
    )
