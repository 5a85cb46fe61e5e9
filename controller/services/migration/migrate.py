"""Live migration: a persistent operation the controller drives step by step.

A migration is an operation (kind ``migrate``) whose ``params["phase"]`` is saved before each step,
so a controller that restarts resumes exactly where it was. Each step is one command with its own
operation id (``<op>:<step>``), which the agent applies once; re-sending a step is always safe.

    prepare   destination: an incoming copy with the same device model (PrepareMigration -> URI)
    send      source: migrate under the policy; its agent runs the stall detector and reports progress
    finish    destination: the copy runs; the record moves to the destination
    cleanup   source: the paused husk is undefined
    rollback  (after a failed prepare or send) destination: the incoming copy is discarded; the VM
              runs on its source, where the record always stayed

The record is switched only after the source reported the migration completed and the destination
confirmed its copy runs, so a failure at any earlier point leaves the record true: the VM runs on its
source. A destination claim (``vms.migrating_to``) holds the room on the destination meanwhile.

It may use ``controller.services.vms`` and ``controller.services.hosts``; ``controller.services.ha``
never meets it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from controller.common.errors import Conflict, DomainError, Invalid
from controller.scheduler import Decision, FleetState, PlacementRequest, Scheduler
from controller.services import placement
from controller.services.agent_rpc import AgentRpc
from controller.services.hosts import HostService
from controller.services.migration.link_budget import LinkBudget
from controller.services.operations import Operations
from controller.services.vms import VmService, busy_error, refusal_error
from controller.state.events import EventHub
from controller.state.live import LiveState
from controller.state.records import VmState
from controller.state.store import OperationRecord, Store, VmRecord
from protocols.messages import (
    AbortMigration,
    CancelMigration,
    FinishMigration,
    MigrateVm,
    MigrationProgress,
    PrepareMigration,
    Reply,
    UndefineVm,
)
from protocols.migration import (
    MIB,
    MigrationPolicy,
    check_policy,
    policy_problems,
    predict,
)
from protocols.rest import MigrationPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MigrationSettings:
    #: How long a destination may take to start its incoming copy.
    prepare_timeout_s: float = 60.0
    #: Backstop for an unreachable source during ``send``. Not a convergence timeout: the source
    #: agent's stall detector ends a migration that cannot converge or whose link is dead.
    send_timeout_s: float = 3600.0
    #: How long to keep trying to reach a host for finish, cleanup and rollback.
    settle_timeout_s: float = 120.0
    #: Evacuation waves: migrations at once off one host; sends at once in the whole fleet.
    per_host: int = 2
    fleet_wide: int = 4
    #: Each host's link budget for migrations, MiB/s (10 GbE less overhead). A migration that starts
    #: while others send from or to its hosts gets an equal share: its policy's bandwidth is capped at
    #: ``host_link_mib_s / (1 + migrations already using the busier of its two hosts)``.
    host_link_mib_s: float = 1170.0


class MigrationService:
    """Plans, starts, cancels and drives live migrations."""

    def __init__(
        self,
        store: Store,
        events: EventHub,
        live: LiveState,
        scheduler: Scheduler,
        fleet_state: FleetState,
        operations: Operations,
        rpc: AgentRpc,
        vms: VmService,
        hosts: HostService,
        settings: MigrationSettings | None = None,
    ) -> None:
        self.store = store
        self.events = events
        self.live = live
        self.scheduler = scheduler
        self.fleet_state = fleet_state
        self.operations = operations
        self.rpc = rpc
        self.vms = vms
        self.hosts = hosts
        self.settings = settings or MigrationSettings()
        operations.register(("migrate",), self.run, self.stalled)
        #: Latest progress by operation id (kept in memory; the events carry the history).
        self.progress: dict[str, MigrationProgress] = {}
        self._fleet_slots = asyncio.Semaphore(self.settings.fleet_wide)
        #: The bandwidth granted to sends under way, per host: never more than its link.
        self.links = LinkBudget(self.settings.host_link_mib_s)

    # -- requests ---------------------------------------------------------------------------------

    def _choose(
        self,
        record: VmRecord,
        to: str | None,
        *,
        claim: bool,
        avoid: tuple[str, ...] = (),
        force: bool = False,
    ) -> Decision:
        """Where ``record`` may go under its placement rules (all but resources and policy if ``force``)."""
        assert record.host_id is not None
        if to is not None:
            self.hosts.require(to)
            if to == record.host_id:
                raise Invalid(
                    "invalid_request", f"vm {record.name!r} already runs on {to!r}; choose another host"
                )
        request = self.request(record, to=to, avoid=avoid, force=force)
        return self.scheduler.select_and_claim(request) if claim else self.scheduler.select(request)

    def request(
        self, record: VmRecord, *, to: str | None = None, avoid: tuple[str, ...] = (), force: bool = False
    ) -> PlacementRequest:
        """The scheduler's request for moving ``record`` off its host: its rules, its dirty rate, and
        its source's engine and accelerator (a live migration needs the same on both ends).

        Raises:
            Conflict: ``to`` breaks the VM's pinned or avoided hosts (see ``placement.move_request``).
        """
        caps = self.store.host(record.host_id) if record.host_id else None
        return msgspec.structs.replace(
            placement.move_request(
                self.store, record, to=to, avoid=avoid, dirty_mib_s=self.dirty_rate(record), force=force
            ),
            engine=caps.capabilities.engine if caps else None,
            accel=caps.capabilities.accel if caps else None,
        )

    def refusal(self, name: str, to: str | None = None, avoid: tuple[str, ...] = ()) -> str | None:
        """Why moving ``name`` (to ``to``) would break its placement rules or not fit; None if it may go."""
        record = self.store.vm(name)
        if record is None or record.host_id is None:
            return f"vm {name!r} has no host"
        try:
            decision = self._choose(record, to, claim=False, avoid=avoid)
        except DomainError as exc:
            return exc.message
        if decision.host_id is None:
            return decision.refusal.message if decision.refusal is not None else "no host can take it"
        return None

    def dirty_rate(self, record: VmRecord) -> float:
        """The VM's dirty rate now, from its host's telemetry (its spec's workload when none)."""
        measured = self.live.vm_dirty_rate(record.host_id or "", record.name)
        return record.spec.workload.dirty_mib_s if measured is None else measured

    def _checked(self, name: str, policy: MigrationPolicy) -> VmRecord:
        problems = check_policy(policy)
        if problems:
            raise Invalid("invalid_policy", policy_problems(f"vm {name!r}", problems))
        record = self.vms.require(name)
        if record.op_id is not None:
            busy = self.store.operation(record.op_id)
            raise busy_error(name, record.op_id, busy.kind if busy else "an")
        unreachable = self.vms.unreachable(record.host_id)
        if unreachable is not None:
            raise Conflict("host_unreachable", f"vm {name!r} cannot be live-migrated: {unreachable}")
        if record.state not in ("running", "paused") or record.host_id is None:
            raise Conflict(
                "invalid_state",
                f"vm {name!r} is {record.state}; only a running or paused VM can be live-migrated "
                "(start it first)",
            )
        return record

    def plan(self, name: str, to: str | None, policy: MigrationPolicy) -> MigrationPlan:
        """Where ``name`` would go and what it would take; changes nothing (``--dry-run``)."""
        record = self._checked(name, policy)
        assert record.host_id is not None
        decision = self._choose(record, to, claim=False)
        dirty = self.dirty_rate(record)
        prediction = predict(record.spec.memory_mib, dirty, policy) if decision.ok else None
        return MigrationPlan(
            vm=name,
            source=record.host_id,
            target=decision.host_id,
            policy=policy,
            dirty_mib_s=dirty,
            prediction=prediction,
            explanation=msgspec.to_builtins(decision.explanation),
        )

    def start(
        self,
        name: str,
        to: str | None,
        policy: MigrationPolicy,
        *,
        avoid: tuple[str, ...] = (),
        force: bool = False,
        reason: str = "",
    ) -> OperationRecord:
        """Begin migrating ``name`` (to ``to``, or where the scheduler says). Returns the operation.

        Raises:
            Invalid: bad policy or target. NotFound: unknown VM or host. Conflict: the VM is busy or not
                running, or no host can take it (with the scheduler's reasons).
        """
        record = self._checked(name, policy)
        assert record.host_id is not None
        if force and not reason.strip():
            raise Invalid(
                "reason_required",
                f"migrate vm {name!r} with force overrides its placement rules; say why with --reason TEXT",
            )
        decision = self._choose(record, to, claim=True, avoid=avoid, force=force)
        if decision.host_id is None:
            raise refusal_error(decision)
        target = decision.host_id
        params = {
            "phase": "prepare",
            "from_host": record.host_id,
            "to_host": target,
            "from_state": record.state,
            "policy": msgspec.to_builtins(policy),
            "prediction": msgspec.to_builtins(
                predict(record.spec.memory_mib, self.dirty_rate(record), policy)
            ),
        }
        if force:
            params["forced"] = reason
        with self.store.transaction():
            op = self.store.insert_operation(
                kind="migrate", vm=name, host_id=record.host_id, params=params, deadline=time.time()
            )
            self.store.update_vm(name, state="migrating", op_id=op.op_id, error="", migrating_to=target)
        self.events.emit(
            "vm.migrate",
            f"migrate vm {name}: {record.host_id} -> {target}",
            host_id=record.host_id,
            vm=name,
            op_id=op.op_id,
        )
        if force:
            self.events.emit(
                "vm.migrate.forced",
                f"migrate vm {name} to {target} overrides its placement rules; reason: {reason.strip()}",
                host_id=record.host_id,
                vm=name,
                op_id=op.op_id,
            )
        self.operations.start(op)
        return op

    async def cancel(self, name: str) -> OperationRecord:
        """Cancel the VM's migration while it is still pre-copy; the VM stays on its source.

        Raises:
            NotFound: unknown VM. Conflict: no migration under way, or past the point of no return.
        """
        record = self.vms.require(name)
        op = self.store.operation(record.op_id) if record.op_id else None
        if op is None or op.kind != "migrate":
            raise Conflict("invalid_state", f"vm {name!r} is not migrating; nothing to cancel")
        phase = op.params.get("phase")
        if phase not in ("prepare", "send"):
            raise Conflict(
                "invalid_state",
                f"the migration of vm {name!r} is past the switch-over ({phase}); it cannot be cancelled",
            )
        op = self.store.update_operation(op.op_id, {**op.params, "cancel": True})
        if phase == "send":
            command = CancelMigration(
                op_id=f"{op.op_id}:cancel:{time.time_ns()}", deadline=time.time() + 10, vm=name
            )
            reply = await self.rpc.exchange(op.params["from_host"], command)
            if reply is not None and not reply.ok and reply.code != "invalid_state":
                raise Conflict("cancel_refused", f"host refused to cancel: {reply.error}")
        self.events.emit("migration.cancel", f"cancel requested for the migration of vm {name}", vm=name)
        return op

    def stalled(self, op: OperationRecord, exc: Exception) -> None:
        """A migration or evacuation hit an internal error: it stays running and resumes at the next start."""
        self.events.emit(
            "operation.stalled",
            f"{op.kind} {op.vm or op.host_id} hit an internal error and resumes at the next controller start: {exc}",
            op_id=op.op_id,
        )

    # -- progress ---------------------------------------------------------------------------------

    def on_progress(self, message: MigrationProgress) -> None:
        op_id = message.op_id.split(":", 1)[0]
        self.progress[op_id] = message
        sample = message.sample
        total = sample.total_bytes or 1
        pct = min(100.0, 100.0 * (total - sample.remaining_bytes) / total)
        text = (
            f"migrate vm {message.vm}: {sample.status}, {pct:.0f}% of memory sent, "
            f"{sample.remaining_bytes / MIB:.1f} MiB left, dirtying {sample.dirty_rate_bytes_s / MIB:.1f} MiB/s, "
            f"round {sample.iteration}, expected downtime {sample.expected_downtime_ms:.0f} ms"
            + (f"; {message.note}" if message.note else "")
        )
        self.events.emit("migration.progress", text, host_id=message.host_id, vm=message.vm, op_id=op_id)

    # -- the state machine ------------------------------------------------------------------------

    async def run(self, op: OperationRecord) -> None:
        record = self.store.vm(op.vm)
        if record is None:
            self.store.finish_operation(op.op_id, "failed", f"vm {op.vm!r} disappeared")
            return
        p = op.params
        source, target = p["from_host"], p["to_host"]
        policy = msgspec.convert(p["policy"], MigrationPolicy)
        phase = p["phase"]
        if phase == "prepare":
            if p.get("cancel"):
                op = self._phase(op, "rollback", error="cancelled by the operator before the stream started")
            else:
                reply = await self.rpc.exchange(
                    target,
                    PrepareMigration(
                        op_id=f"{op.op_id}:prepare",
                        deadline=time.time() + self.settings.prepare_timeout_s,
                        spec=record.spec,
                        source_host=source,
                        policy=policy,
                    ),
                )
                cancelled = self._current(op).params.get("cancel")
                if reply is not None and reply.ok and cancelled:
                    op = self._phase(op, "rollback", uri=reply.uri, error="cancelled by the operator")
                elif reply is not None and reply.ok:
                    op = self._phase(op, "send", uri=reply.uri)
                else:
                    why = self._why(reply, target)
                    op = self._phase(op, "rollback", error=f"destination {target} could not prepare: {why}")
        if op.params["phase"] == "send":
            op = await self._send(op, source, target, policy)
        if op.params["phase"] == "finish":
            op = await self._finish_on(op, target)
        if op.params["phase"] == "cleanup":
            await self._cleanup(op, source, target)
        elif op.params["phase"] == "rollback":
            await self._rollback(op, source, target)

    async def _settle(
        self,
        host: str,
        op: OperationRecord,
        step: str,
        kind: type[FinishMigration | UndefineVm | AbortMigration],
    ) -> Reply | None:
        """Send step ``step`` (a ``kind`` command for the VM) to ``host``, retrying for the settle time."""
        deadline = time.time() + self.settings.settle_timeout_s
        return await self.rpc.exchange(host, kind(op_id=f"{op.op_id}:{step}", deadline=deadline, vm=op.vm))

    @staticmethod
    def _why(reply: Reply | None, host: str) -> str:
        """What went wrong with a step that did not succeed."""
        return reply.error if reply is not None else f"host {host} did not answer"

    def _current(self, op: OperationRecord) -> OperationRecord:
        """``op`` as the store has it now (a cancel may have marked it meanwhile)."""
        return self.store.operation(op.op_id) or op

    def _phase(self, op: OperationRecord, phase: str, **more: Any) -> OperationRecord:
        params = {**self._current(op).params, **more, "phase": phase}
        return self.store.update_operation(op.op_id, params)

    async def _send(
        self, op: OperationRecord, source: str, target: str, policy: MigrationPolicy
    ) -> OperationRecord:
        op = self._current(op)
        if op.params.get("cancel") and "send_started" not in op.params:
            return self._phase(op, "rollback", error="cancelled by the operator before the stream started")
        async with self._fleet_slots:
            if "send_started" not in op.params:
                # The bandwidth is granted when the stream starts; a resumed send re-uses it, so the
                # re-sent command is the same command.
                granted = await self.links.grant(
                    source, target, policy.bandwidth_mib_s, f"migration {op.op_id} of {op.vm}",
                    cancelled=lambda: bool(self._current(op).params.get("cancel")),
                )  # fmt: skip
                if granted is None:
                    return self._phase(
                        op, "rollback", error="cancelled by the operator before the stream started"
                    )
                op = self.store.update_operation(
                    op.op_id,
                    {**self._current(op).params, "send_started": time.time(), "bandwidth_mib_s": granted},
                )
            else:
                self.links.take(source, target, op.params["bandwidth_mib_s"])
            command = MigrateVm(
                op_id=f"{op.op_id}:send",
                deadline=op.params["send_started"] + self.settings.send_timeout_s,
                vm=op.vm,
                uri=op.params["uri"],
                dest_host=target,
                policy=msgspec.structs.replace(policy, bandwidth_mib_s=op.params["bandwidth_mib_s"]),
            )
            try:
                reply = await self.rpc.exchange(source, command)
            finally:
                await self.links.give_back(source, target, op.params["bandwidth_mib_s"])
        if reply is not None and reply.ok:
            result = msgspec.to_builtins(reply.migration) if reply.migration else {}
            return self._phase(op, "finish", result=result)
        if reply is None:
            why = (
                f"source {source} did not report the migration's end within {self.settings.send_timeout_s:g}s"
            )
        else:
            why = reply.error
        result = msgspec.to_builtins(reply.migration) if reply is not None and reply.migration else {}
        return self._phase(op, "rollback", error=why, result=result)

    async def _finish_on(self, op: OperationRecord, target: str) -> OperationRecord:
        reply = await self._settle(target, op, "finish", FinishMigration)
        if reply is None or not reply.ok:
            # The stream completed, so the source holds only a stopped husk: the VM is the
            # destination's copy, whatever state it is in. Record it there and say what went wrong.
            why = self._why(reply, target)
            log.error("migration %s: finishing on %s failed: %s", op.op_id, target, why)
            return self._switch(
                op, target, "error", error=f"the migrated copy on {target} did not confirm: {why}"
            )
        return self._switch(op, target, "running")

    def _switch(self, op: OperationRecord, target: str, state: Any, error: str = "") -> OperationRecord:
        source = op.params["from_host"]
        with self.store.transaction():
            self.store.update_vm(op.vm, host_id=target, migrating_to=None, state=state, error=error)
            self.fleet_state.release(op.vm, source)
            op = self._phase(op, "cleanup", switch_error=error)
        self.events.emit(
            "vm.migrated",
            f"vm {op.vm} now runs on {target} (was {source})" + self._result_text(op),
            host_id=target,
            vm=op.vm,
            op_id=op.op_id,
        )
        return op

    @staticmethod
    def _result_text(op: OperationRecord) -> str:
        r = op.params.get("result") or {}
        if not r:
            return ""
        return (
            f": {r.get('total_ms', 0):.0f} ms in total, {r.get('downtime_ms', 0):.0f} ms of downtime, "
            f"{r.get('transferred_bytes', 0) / MIB:.0f} MiB sent in {r.get('iterations', 0)} rounds"
        )

    async def _cleanup(self, op: OperationRecord, source: str, target: str) -> None:
        self.progress.pop(op.op_id, None)
        reply = await self._settle(source, op, "cleanup", UndefineVm)
        note = ""
        if reply is None or not (reply.ok or reply.code == "unknown_vm"):
            why = self._why(reply, source)
            note = f"; the paused copy on {source} was not removed ({why}); it is removed when {source} reports it"
        error = op.params.get("switch_error", "")
        current = self.store.vm(op.vm)
        if current is not None and current.op_id == op.op_id:
            crashed = self._died_on(target, op)
            self.store.update_vm(op.vm, op_id=None, **({"state": crashed} if crashed else {}))
            if crashed and current.state != crashed:
                self.events.emit(
                    "vm.state",
                    f"vm {op.vm} is {crashed} on {target}: its QEMU died after the switch-over, "
                    "while the migration was cleaning up",
                    host_id=target,
                    vm=op.vm,
                    op_id=op.op_id,
                )
        self.store.finish_operation(op.op_id, "failed" if error else "succeeded", (error + note).lstrip("; "))
        self.events.emit(
            "operation.succeeded" if not error else "operation.failed",
            f"migrate vm {op.vm}: {source} -> {target} done" + note
            if not error
            else f"migrate vm {op.vm}: {error}",
            host_id=target,
            vm=op.vm,
            op_id=op.op_id,
        )

    def _died_on(self, host: str, op: OperationRecord) -> VmState | None:
        """The state "crashed" if ``host`` reported the VM crashed since the migration began: the source's QEMU
        died during the rollback, or the destination's after the switch-over. The record ignores VM
        events while the migration holds it, and an agent sends its inventory only when something
        changes, so without this the hold's release would keep the state from before the crash.
        """
        inventory = self.live.inventories.get(host)
        if inventory is None or inventory.ts < op.created_at:
            return None
        copy = next((vm for vm in inventory.vms if vm.name == op.vm), None)
        return "crashed" if copy is not None and copy.state == "crashed" else None

    async def _overrule(self, op: OperationRecord, source: str, target: str, why: str) -> None:
        """The destination holds the whole guest although the send was reported failed (the source's
        QEMU died after the last byte, before its agent saw the end): finish there, and clean the
        source up as after any switch-over (its cleanup powers off a copy that still runs).
        """
        log.warning("migration %s: rollback refused by %s: %s", op.op_id, target, why)
        self.events.emit(
            "migration.overruled",
            f"migrate vm {op.vm}: the source reported a failure ({op.params.get('error', '')}), but {why}",
            host_id=target,
            vm=op.vm,
            op_id=op.op_id,
        )
        op = self._phase(op, "finish", overruled=op.params.get("error", ""))
        op = await self._finish_on(op, target)
        await self._cleanup(op, source, target)

    async def _rollback(self, op: OperationRecord, source: str, target: str) -> None:
        self.progress.pop(op.op_id, None)
        reply = await self._settle(target, op, "abort", AbortMigration)
        if reply is not None and reply.code == "migration_completed":
            await self._overrule(op, source, target, reply.error)
            return
        leftover = ""
        if reply is None or not reply.ok:
            why = self._why(reply, target)
            leftover = f"; the incoming copy on {target} could not be discarded yet ({why})"
        current = self.store.vm(op.vm)
        state = self._died_on(source, op) or op.params.get("from_state", "running")
        with self.store.transaction():
            if current is not None and current.op_id == op.op_id:
                self.store.update_vm(op.vm, state=state, op_id=None, migrating_to=None)
            self.fleet_state.release(op.vm, target)
            error = op.params.get("error", "the migration failed") + leftover
            self.store.finish_operation(op.op_id, "failed", error)
        self.events.emit(
            "operation.failed",
            f"migrate vm {op.vm} to {target} failed; it runs on {source}: {error}",
            host_id=source,
            vm=op.vm,
            op_id=op.op_id,
        )
