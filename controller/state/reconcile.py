"""Reconciliation: make the store agree with what a host reports it runs.

:func:`reconcile` is a function over the store and the event hub. It writes the records and returns
what is left for others to do: the VMs it adopted (the scheduler's claims follow them) and the stale
copies a host still holds of a VM that runs elsewhere (restarted by HA, or migrated), which the
clean-up service removes from the host.

Adoption is guarded, because a host's inventory is the host's word only. One round adopts at most
``AdoptionLimits.per_round`` unknown VMs; the rest are counted in ``Reconciled.deferred`` and left for
later rounds (the next inventory of the host). A name the store holds for another host is never
taken, and a name it holds with no host (a create or restart that failed) only by the host that
operation targeted. Such a name-squatting report is counted in ``Reconciled.squatted``, logged once
per round, and recorded as at most ``AdoptionLimits.events_per_round`` events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from controller.state.events import EventHub
from controller.state.store import Store, VmState
from protocols.messages import HostInventory, VmPowerState, VmStatus

log = logging.getLogger(__name__)

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
    #: Unknown VMs the host reports that this round left for later (over ``AdoptionLimits.per_round``).
    deferred: int = 0
    #: VMs the host reports under a name the store holds for another host, or for no host while the
    #: VM's last create or restart targeted someone else.
    squatted: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AdoptionLimits:
    #: Unknown VMs one reconciliation round adopts from one host; the rest wait for later rounds.
    per_round: int = 256
    #: Events (``vm.conflict``) one round records about names a host may not take; the rest are summed.
    events_per_round: int = 10


def reconcile(
    store: Store, events: EventHub, inventory: HostInventory, limits: AdoptionLimits | None = None
) -> Reconciled:
    """Record ``inventory``'s host and VMs in the store; return the adoptions and stale copies."""
    host_id = inventory.host_id
    done = Reconciled(host_is_new=store.host(host_id) is None)
    limits = limits or AdoptionLimits()
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
            _reconcile_reported(store, events, host_id, status, done, limits)
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
    _report_guarded(events, host_id, done, limits)
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


def _report_guarded(events: EventHub, host_id: str, done: Reconciled, limits: AdoptionLimits) -> None:
    """One log line (and at most one summary event) for the round's deferred and refused adoptions."""
    if done.deferred:
        log.warning(
            "host %s: adopted %d unknown VMs this round (the limit); %d more wait for later rounds",
            host_id, len(done.adopted), done.deferred,
        )  # fmt: skip
    if done.squatted:
        shown = ", ".join(done.squatted[:5]) + (", ..." if len(done.squatted) > 5 else "")
        log.warning(
            "host %s reports %d VMs under names the store holds for other hosts or for no host (%s); "
            "not adopted. If the host really runs them, delete the records or the host's copies",
            host_id, len(done.squatted), shown,
        )  # fmt: skip
        if len(done.squatted) > limits.events_per_round:
            events.emit(
                "vm.conflict",
                f"host {host_id} reports {len(done.squatted)} VMs whose names the store holds elsewhere "
                f"({shown}); {len(done.squatted) - limits.events_per_round} not listed one by one",
                host_id=host_id,
            )


def _squatted(
    events: EventHub, host_id: str, vm: str, why: str, done: Reconciled, limits: AdoptionLimits
) -> None:
    done.squatted.append(vm)
    if len(done.squatted) <= limits.events_per_round:
        events.emit("vm.conflict", f"vm {vm} is reported by {host_id} but {why}", host_id=host_id, vm=vm)


def _may_take_hostless(store: Store, host_id: str, vm: str) -> bool:
    """Whether ``host_id`` may adopt the hostless record of ``vm``: its last operation was a create or
    restart that targeted this host (it timed out, and the host made the VM after all).
    """
    last = store.last_operation(vm)
    return last is not None and last.kind in ("create", "restart") and last.host_id == host_id


def _reconcile_reported(
    store: Store, events: EventHub, host_id: str, status: VmStatus, done: Reconciled, limits: AdoptionLimits
) -> None:
    record = store.vm(status.name)
    state = POWER_TO_VM_STATE[status.state]
    if record is None:
        if len(done.adopted) >= limits.per_round:
            done.deferred += 1
            return
        store.insert_vm(status.spec, host_id, state, None)
        done.adopted.append(status.name)
        events.emit(
            "vm.adopted", f"vm {status.name} found on {host_id} and adopted", host_id=host_id, vm=status.name
        )
        return
    if record.host_id is None and record.op_id is None:
        if not _may_take_hostless(store, host_id, status.name):
            _squatted(events, host_id, status.name, "its record has no host and its last create or restart "
                      "targeted another host", done, limits)  # fmt: skip
            return
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
        _squatted(events, host_id, status.name, f"recorded on {record.host_id}", done, limits)
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
