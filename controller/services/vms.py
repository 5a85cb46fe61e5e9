"""VM use cases: place and create VMs, run their lifecycle operations, and restart them for HA.

A create goes through the scheduler, which claims the host; the VM's row (the claim) and its create
operation are written in one transaction with no await since the decision, so concurrent creates never
overbook a host. Each lifecycle operation is one command to the VM's host through
:class:`~controller.services.agent_rpc.AgentRpc`, run by :class:`~controller.services.operations.Operations`.
When the deadline passes without a reply the operation fails and the claim is released; should the
agent apply it anyway, reconciliation adopts what it reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from controller.common.errors import Conflict, Invalid, NotFound
from controller.scheduler import (
    GROUP_LABEL,
    Decision,
    FleetState,
    PlacementRequest,
    Scheduler,
    SchedulerSettings,
    SchedulingHints,
    UnknownPolicyError,
)
from controller.services import admission, placement
from controller.services.agent_rpc import AgentRpc
from controller.services.labels import VmLabels
from controller.services.operations import Operations
from controller.state.events import EventHub
from controller.state.reconcile import POWER_TO_VM_STATE
from controller.state.store import OperationRecord, OpKind, Store, VmRecord, VmState
from protocols.messages import (
    Command,
    DefineVm,
    DestroyVm,
    PauseVm,
    RebootVm,
    Reply,
    ResumeVm,
    ShutdownVm,
    StartVm,
    UndefineVm,
    VmEvent,
)
from protocols.vmspec import VmSpec

log = logging.getLogger(__name__)

#: The operation kinds this service runs.
VM_KINDS: tuple[OpKind, ...] = ("create", "restart", "start", "stop", "pause", "resume", "reboot", "delete")


@dataclass(frozen=True, slots=True)
class VmSettings:
    """What the VM service needs of the controller's settings."""

    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    #: How long an operation may take before it fails and releases what it claimed.
    operation_timeout_s: float = 60.0
    #: Admission control: refuse placements that would leave the HA VMs of this many failed hosts
    #: without room to restart (0: off).
    host_failures_to_tolerate: int = 0


def busy_error(name: str, op_id: str, what: str) -> Conflict:
    """The one wording of "this VM is busy with another operation"."""
    return Conflict(
        "vm_busy", f"vm {name!r} is busy with {what} operation {op_id}; wait for it to finish and retry"
    )


class VmService:
    """Creates VMs and runs their lifecycle operations."""

    def __init__(
        self,
        store: Store,
        events: EventHub,
        scheduler: Scheduler,
        fleet_state: FleetState,
        operations: Operations,
        rpc: AgentRpc,
        settings: VmSettings,
        health: Callable[[str], str] = lambda _host: "up",
    ) -> None:
        self.store = store
        self.events = events
        self.scheduler = scheduler
        self.fleet_state = fleet_state
        self.operations = operations
        self.rpc = rpc
        self.settings = settings
        #: A host's health as HA judges it ("up", "suspect", "failed", "offline").
        self.health = health
        #: The operator's labels on VMs (metadata: no operation, no agent).
        self.labels = VmLabels(store, events)
        operations.register(VM_KINDS, self._run, self.crashed)

    # -- queries ----------------------------------------------------------------------------------

    def require(self, name: str) -> VmRecord:
        """The record of VM ``name``.

        Raises:
            NotFound: no such VM.
        """
        record = self.store.vm(name)
        if record is None:
            raise NotFound("unknown_vm", f"vm {name!r} does not exist; list VMs with `fleetvisor vm list`")
        return record

    def require_idle(self, name: str) -> VmRecord:
        """The record of VM ``name``, which no operation holds.

        Raises:
            NotFound: no such VM. Conflict: another operation holds it.
        """
        record = self.require(name)
        if record.op_id is not None:
            busy = self.store.operation(record.op_id)
            raise busy_error(name, record.op_id, busy.kind if busy else "an")
        return record

    def unreachable(self, host_id: str | None) -> str | None:
        """Why no command can reach ``host_id`` now (offline, failed, fenced), with what to do; None if it can."""
        if host_id is None:
            return None
        host = self.store.host(host_id)
        health = self.health(host_id)
        if (
            host is not None
            and host.online
            and health not in ("failed", "offline")
            and host.fenced_at is None
        ):
            return None
        if host is not None and host.fenced_at is not None:
            state = "fenced"
        elif host is None or not host.online:
            state = "offline"
        else:
            state = health
        reason = f" ({host.state_reason})" if host is not None and host.state_reason else ""
        return (
            f"its host {host_id} is {state}{reason}, so nothing can reach the VM until the host is back. "
            f"Wait for it; if the host is gone, `fleetvisor host confirm-down {host_id}` (admin) lets HA "
            f"restart its HA VMs elsewhere, and `fleetvisor host forget {host_id}` removes it and its records"
        )

    def _fenced(self, host_id: str | None) -> bool:
        host = self.store.host(host_id) if host_id else None
        return host is not None and host.fenced_at is not None

    def running_count(self) -> int:
        """How many VMs are recorded as running."""
        return sum(1 for vm in self.store.vms() if vm.state == "running")

    # -- placement and create ---------------------------------------------------------------------

    def plan(self, spec: VmSpec, hints: SchedulingHints | None = None) -> Decision:
        """Where ``spec`` would go now, with the explanation; claims nothing (``--dry-run``).

        Raises:
            Invalid: an unknown policy.
        """
        hints, _ = placement.resolve_group(self.store, hints)
        try:
            return self.scheduler.select(PlacementRequest.from_spec(spec, hints))
        except UnknownPolicyError as exc:
            raise Invalid("unknown_policy", str(exc)) from None

    def plan_batch(
        self, template: VmSpec, count: int, hints: SchedulingHints | None = None
    ) -> list[Decision]:
        """Where ``count`` VMs ``<name>-1..N`` would go, planned as a whole; claims nothing.

        Raises:
            Conflict: the batch cannot be placed, with the reason. Invalid: an unknown policy.
        """
        hints, _ = placement.resolve_group(self.store, hints)
        specs = [_with_group(msgspec.structs.replace(template, name=f"{template.name}-{i}"), hints)
                 for i in range(1, count + 1)]  # fmt: skip
        try:
            batch = self.scheduler.select_batch([PlacementRequest.from_spec(s, hints) for s in specs])
        except UnknownPolicyError as exc:
            raise Invalid("unknown_policy", str(exc)) from None
        if not batch.ok:
            raise Conflict("no_valid_host", f"batch {template.name!r} of {count}: {batch.message}")
        return batch.decisions

    def create(
        self, spec: VmSpec, start: bool = True, hints: SchedulingHints | None = None
    ) -> tuple[VmRecord, OperationRecord, Decision]:
        """Place ``spec``, claim the host, record the VM and its create operation, and start it.

        Raises:
            Conflict: the name is taken, no host fits, or admission control refuses (with the
                explanation). Invalid: an unknown policy.
        """
        if self.store.vm(spec.name) is not None:
            raise Conflict(
                "vm_exists", f"vm {spec.name!r} already exists; choose another name or delete it first"
            )
        hints, new_group = placement.resolve_group(self.store, hints)
        spec = _with_group(spec, hints)
        request = PlacementRequest.from_spec(spec, hints)
        # No await from here to the store write: in one event loop this is the claim lock.
        try:
            decision = self.scheduler.select_and_claim(request)
        except UnknownPolicyError as exc:
            raise Invalid("unknown_policy", str(exc)) from None
        if decision.refusal is not None or decision.host_id is None:
            raise refusal_error(decision)
        host_id = decision.host_id
        try:
            self._admit(spec, host_id)
            with self.store.transaction():
                if new_group and hints is not None and hints.group is not None:
                    self.store.insert_group(hints.group, hints.group_policy or placement.DEFAULT_GROUP_POLICY)
                record, op = self._insert_create(spec, host_id, start, hints)
        except BaseException:
            self.fleet_state.release(spec.name, host_id)
            raise
        self._created(record, op)
        return record, op, decision

    def create_batch(
        self, template: VmSpec, count: int, start: bool = True, hints: SchedulingHints | None = None
    ) -> list[tuple[VmRecord, OperationRecord, Decision]]:
        """Create ``count`` VMs named ``<name>-1..N``, planned as a whole (an anti-affinity group is
        spread before anything is claimed) and claimed all or nothing.

        Raises:
            Conflict: a name is taken or the batch cannot be placed, with the reason.
            Invalid: an unknown policy.
        """
        specs = [msgspec.structs.replace(template, name=f"{template.name}-{i}") for i in range(1, count + 1)]
        taken = [s.name for s in specs if self.store.vm(s.name) is not None]
        if taken:
            raise Conflict("vm_exists", f"vms {', '.join(taken)} already exist; choose another name prefix")
        hints, new_group = placement.resolve_group(self.store, hints)
        specs = [_with_group(s, hints) for s in specs]
        requests = [PlacementRequest.from_spec(s, hints) for s in specs]
        try:
            batch = self.scheduler.select_batch(requests)
        except UnknownPolicyError as exc:
            raise Invalid("unknown_policy", str(exc)) from None
        if not batch.ok:
            raise Conflict("no_valid_host", f"batch {template.name!r} of {count}: {batch.message}")
        claims = self.scheduler.commit_batch(requests, batch)
        placed = [
            (s, d.host_id) for s, d, c in zip(specs, batch.decisions, claims, strict=True) if c and d.host_id
        ]
        decided = {d.vm: d for d in batch.decisions}
        created: list[tuple[VmRecord, OperationRecord]] = []
        try:
            with self.store.transaction():
                if new_group and hints is not None and hints.group is not None and placed:
                    self.store.insert_group(hints.group, hints.group_policy or placement.DEFAULT_GROUP_POLICY)
                for spec, host_id in placed:
                    created.append(self._insert_create(spec, host_id, start, hints))
        except BaseException:
            for spec, host_id in placed:
                self.fleet_state.release(spec.name, host_id)
            raise
        for record, op in created:
            self._created(record, op)
        return [(record, op, decided[record.name]) for record, op in created]

    def _created(self, record: VmRecord, op: OperationRecord) -> None:
        self.events.emit(
            "vm.creating",
            f"vm {record.name} placed on {record.host_id}",
            host_id=record.host_id or "",
            vm=record.name,
            op_id=op.op_id,
        )
        self.operations.start(op)

    def _insert_create(
        self, spec: VmSpec, host_id: str, start: bool, hints: SchedulingHints | None = None
    ) -> tuple[VmRecord, OperationRecord]:
        """The VM row (its claim, and the placement rules it keeps) and its create operation.

        Call it inside a transaction.
        """
        op = self.store.insert_operation(
            kind="create", vm=spec.name, host_id=host_id, params={"start": start}, deadline=self._deadline()
        )
        return self.store.insert_vm(spec, host_id, "creating", op.op_id, placement.stored(hints)), op

    def _deadline(self) -> float:
        return time.time() + self.settings.operation_timeout_s

    def _admit(self, spec: VmSpec, host_id: str) -> None:
        """Raises Conflict when HA admission control refuses ``spec`` on ``host_id``."""
        tolerate = self.settings.host_failures_to_tolerate
        if tolerate <= 0:
            return
        why = admission.problem(
            spec,
            host_id,
            self.store.hosts(),
            self.store.usage(),
            self.store.vms(),
            self.settings.scheduler,
            tolerate,
        )
        if why is not None:
            raise Conflict("admission_control", why, {"tolerate": tolerate})

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, name: str) -> OperationRecord:
        """Start a stopped VM. Raises NotFound or Conflict."""
        return self._operation(
            name, "start", {}, allowed=("stopped", "crashed", "error", "missing"), new_state="starting"
        )

    def stop(self, name: str, force: bool = False, timeout_s: float = 30.0) -> OperationRecord:
        """Shut a VM down (``force``: power it off at once). Raises NotFound or Conflict."""
        return self._operation(
            name,
            "stop",
            {"force": force, "timeout_s": timeout_s},
            allowed=("running", "paused", "starting", "crashed", "missing", "stopping"),
            new_state="stopping",
        )

    def pause(self, name: str) -> OperationRecord:
        """Freeze a running VM's vCPUs. Raises NotFound or Conflict."""
        return self._operation(name, "pause", {}, allowed=("running",), new_state="running")

    def resume(self, name: str) -> OperationRecord:
        """Thaw a paused VM. Raises NotFound or Conflict."""
        return self._operation(name, "resume", {}, allowed=("paused",), new_state="paused")

    def reboot(self, name: str) -> OperationRecord:
        """Reset a running VM's guest. Raises NotFound or Conflict."""
        return self._operation(name, "reboot", {}, allowed=("running",), new_state="running")

    def delete(self, name: str) -> OperationRecord:
        """Delete a VM wherever it is. Raises NotFound or Conflict."""
        return self._operation(name, "delete", {}, allowed=None, new_state="deleting")

    def _operation(
        self,
        name: str,
        kind: OpKind,
        params: dict[str, Any],
        allowed: tuple[str, ...] | None,
        new_state: VmState,
    ) -> OperationRecord:
        record = self.require_idle(name)
        if allowed is not None and record.state not in allowed:
            raise Conflict(
                "invalid_state",
                f"vm {name!r} is {record.state}; {kind} needs it to be one of: {', '.join(allowed)}",
            )
        if kind != "delete" and record.host_id is None:
            raise Conflict(
                "no_host", f"vm {name!r} has no host (state {record.state}); delete it and create it again"
            )
        unreachable = self.unreachable(record.host_id)
        if unreachable is not None and not (kind == "delete" and self._fenced(record.host_id)):
            raise Conflict("host_unreachable", f"vm {name!r}: {unreachable}")
        params = {**params, "from_state": record.state}
        with self.store.transaction():
            op = self.store.insert_operation(
                kind=kind, vm=name, host_id=record.host_id, params=params, deadline=self._deadline()
            )
            self.store.update_vm(name, state=new_state, op_id=op.op_id, error="")
        self.events.emit(
            f"vm.{kind}", f"{kind} vm {name}", host_id=record.host_id or "", vm=name, op_id=op.op_id
        )
        self.operations.start(op)
        return op

    def restart(self, record: VmRecord, new_host: str, failed_host: str) -> OperationRecord:
        """Move an HA VM's record from ``failed_host`` to ``new_host`` and start it there.

        The caller has moved the scheduler's claim already (no await in between).
        """
        with self.store.transaction():
            op = self.store.insert_operation(
                kind="restart",
                vm=record.name,
                host_id=new_host,
                params={"from_host": failed_host, "from_state": record.state},
                deadline=self._deadline(),
            )
            self.store.update_vm(record.name, host_id=new_host, state="starting", op_id=op.op_id, error="")
        self.events.emit(
            "ha.restarting",
            f"vm {record.name} (HA, priority {record.spec.ha_priority}) restarting on {new_host} "
            f"after {failed_host} failed",
            host_id=new_host,
            vm=record.name,
            op_id=op.op_id,
        )
        self.operations.start(op)
        return op

    # -- what agents report -----------------------------------------------------------------------

    def on_event(self, message: VmEvent) -> None:
        """A VM's state changed on its host: follow it in the record (unless an operation holds it)."""
        record = self.store.vm(message.vm)
        if record is not None and record.host_id == message.host_id and record.op_id is None:
            if message.event == "undefined":
                return
            new_state = POWER_TO_VM_STATE[message.state]
            if record.state != new_state:
                self.store.update_vm(message.vm, state=new_state)
        reason = f" ({message.reason})" if message.reason else ""
        self.events.emit(
            f"vm.{message.event}",
            f"vm {message.vm} {message.event} on {message.host_id}{reason}",
            host_id=message.host_id,
            vm=message.vm,
            op_id=message.op_id,
        )

    def settle_late_reply(self, reply: Reply) -> bool:
        """A reply for an operation already failed by its timeout: the agent did act, only late.

        Only a delete is settled here: its VM is gone from the host, so the record goes too (else the
        next inventory would call the VM missing). A late create or restart needs nothing: the VM's
        record has no host, and the next inventory adopts it where it runs. Any other late reply
        changes no record; the next inventory reconciles the VM's state. Returns whether ``reply``
        belonged to a failed operation.
        """
        op = self.store.operation(reply.op_id)
        if op is None or op.state != "failed":
            return False
        record = self.store.vm(op.vm)
        done = reply.ok or _counts_as_success(op, reply)
        log.info("op %s (%s vm %s): late reply from %s, ok=%s", op.op_id, op.kind, op.vm, reply.host_id, done)
        if not (done and op.kind == "delete" and record is not None and record.op_id is None):
            return True
        if record.host_id != reply.host_id:
            return True
        late_s = reply.ts - op.deadline
        with self.store.transaction():
            self.store.delete_vm(op.vm)
            self.fleet_state.release(op.vm)
            self.store.finish_operation(
                op.op_id, "succeeded", f"the host replied {late_s:.1f}s after the timeout"
            )
        self.events.emit(
            "operation.succeeded",
            f"delete vm {op.vm}: done (host {reply.host_id} replied {late_s:.1f}s after the timeout)",
            host_id=reply.host_id,
            vm=op.vm,
            op_id=op.op_id,
        )
        return True

    # -- the handler ------------------------------------------------------------------------------

    async def _run(self, op: OperationRecord) -> None:
        record = self.store.vm(op.vm)
        if record is None:
            self.operations.finish(op, ok=False, error=f"vm {op.vm!r} disappeared before {op.kind} could run")
            return
        if op.kind == "delete" and (record.host_id is None or self._fenced(record.host_id)):
            self.store.delete_vm(op.vm)
            self.fleet_state.release(op.vm)
            self.operations.finish(op, ok=True)
            return
        assert op.host_id is not None
        reply = await self.rpc.exchange(op.host_id, _command_for(op, record))
        if reply is None:
            self._apply_failure(op, "timeout", self._timeout_message(op))
        elif reply.ok or _counts_as_success(op, reply):
            self._apply_success(op, reply)
        else:
            self._apply_failure(op, reply.code, reply.error)

    def crashed(self, op: OperationRecord, exc: Exception) -> None:
        """A VM operation's handler crashed: the operation fails and releases what it claimed."""
        self._apply_failure(op, "internal", f"internal error: {type(exc).__name__}: {exc}")

    def _timeout_message(self, op: OperationRecord) -> str:
        host = self.store.host(op.host_id or "")
        state = "offline" if host is not None and not host.online else "online"
        return (
            f"host {op.host_id} ({state}) did not answer {op.kind} of vm {op.vm} within "
            f"{self.settings.operation_timeout_s:g}s; check the agent with `fleetvisor host show {op.host_id}`"
        )

    def _apply_success(self, op: OperationRecord, reply: Reply) -> None:
        with self.store.transaction():
            if op.kind == "delete":
                self.store.delete_vm(op.vm)
                self.fleet_state.release(op.vm)
            else:
                state: VmState = (
                    POWER_TO_VM_STATE[reply.vm.state]
                    if reply.vm
                    else ("stopped" if op.kind == "stop" else "running")
                )
                self.store.update_vm(op.vm, state=state, op_id=None, error="")
            self.operations.finish(op, ok=True)

    def _apply_failure(self, op: OperationRecord, code: str, error: str) -> None:
        with self.store.transaction():
            record = self.store.vm(op.vm)
            if record is not None and record.op_id == op.op_id:
                if op.kind in ("create", "restart"):
                    # Release the claim: the VM did not come to exist anywhere we know of.
                    self.fleet_state.release(op.vm)
                    self.store.update_vm(op.vm, state="error", host_id=None, op_id=None, error=error)
                else:
                    previous: VmState = (
                        "missing" if code == "unknown_vm" else op.params.get("from_state", "error")
                    )
                    self.store.update_vm(op.vm, state=previous, op_id=None, error=error)
            self.operations.finish(op, ok=False, error=f"{code}: {error}" if code else error)


def refusal_error(decision: Decision) -> Conflict:
    """The Conflict a refused decision becomes, with the explanation in its detail."""
    refusal = decision.refusal
    message = refusal.message if refusal is not None else f"no host for vm {decision.vm!r}"
    return Conflict(
        "no_valid_host",
        message,
        {
            "rejected": dict(decision.explanation.rejected),
            "explanation": msgspec.to_builtins(decision.explanation),
        },
    )


def _with_group(spec: VmSpec, hints: SchedulingHints | None) -> VmSpec:
    # Group membership is kept on the VM, so the scheduler rebuilds its groups after a restart.
    if hints is None or hints.group is None:
        return spec
    return msgspec.structs.replace(spec, labels={**spec.labels, GROUP_LABEL: hints.group})


def _counts_as_success(op: OperationRecord, reply: Reply) -> bool:
    # Deleting what is already gone is done; creating what already exists there is done.
    return (op.kind == "delete" and reply.code == "unknown_vm") or (
        op.kind == "create" and reply.code == "vm_exists"
    )


def _command_for(op: OperationRecord, record: VmRecord) -> Command:
    common: dict[str, Any] = {"op_id": op.op_id, "deadline": op.deadline}
    if op.kind in ("create", "restart"):
        return DefineVm(spec=record.spec, start=bool(op.params.get("start", True)), **common)
    simple: dict[str, type[Command]] = {
        "start": StartVm,
        "pause": PauseVm,
        "resume": ResumeVm,
        "reboot": RebootVm,
    }
    if op.kind in simple:
        return simple[op.kind](vm=op.vm, **common)  # type: ignore[call-arg]
    if op.kind == "stop":
        if op.params.get("force"):
            return DestroyVm(vm=op.vm, **common)
        return ShutdownVm(vm=op.vm, timeout_s=float(op.params.get("timeout_s", 30.0)), **common)
    return UndefineVm(vm=op.vm, **common)
