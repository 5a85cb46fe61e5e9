"""Moves of a VM that are not live migrations: a cold move of a stopped VM's definition (maintenance
drains stopped VMs too), and an HA restart elsewhere of a VM whose host is fenced.

Both keep the VM's placement rules (:mod:`controller.services.placement`). It may use
``controller.services.vms`` and the layers below the services; HA and evacuation use it.
"""

from __future__ import annotations

import time

from controller.common.errors import Conflict
from controller.scheduler import FleetState, Scheduler
from controller.services import placement
from controller.services.agent_rpc import AgentRpc
from controller.services.operations import Operations
from controller.services.vms import VmService, refusal_error
from controller.state.events import EventHub
from controller.state.store import OperationRecord, Store
from protocols.messages import DefineVm, UndefineVm


class VmMoves:
    """Cold moves and HA restarts elsewhere."""

    def __init__(
        self,
        store: Store,
        events: EventHub,
        scheduler: Scheduler,
        fleet_state: FleetState,
        operations: Operations,
        rpc: AgentRpc,
        vms: VmService,
    ) -> None:
        self.store = store
        self.events = events
        self.scheduler = scheduler
        self.fleet_state = fleet_state
        self.operations = operations
        self.rpc = rpc
        self.vms = vms
        operations.register(("move",), self._run_move, vms.crashed)

    def cold_move(self, name: str, avoid: tuple[str, ...] = ()) -> OperationRecord:
        """Move a stopped VM's definition to another host its placement rules allow (maintenance).

        The destination defines it (not started), then the source undefines its copy, then the record
        moves. Nothing runs meanwhile, so nothing can run twice.

        Raises:
            NotFound: no such VM. Conflict: it is busy or not stopped, its host is unreachable, or no
                host may take it (with the scheduler's reasons).
        """
        record = self.vms.require_idle(name)
        if record.state not in ("stopped", "crashed") or record.host_id is None:
            raise Conflict("invalid_state", f"vm {name!r} is {record.state}; a cold move needs it stopped")
        unreachable = self.vms.unreachable(record.host_id)
        if unreachable is not None:
            raise Conflict("host_unreachable", f"vm {name!r}: {unreachable}")
        request = placement.move_request(self.store, record, avoid=avoid)
        decision = self.scheduler.select_and_claim(request)
        if decision.host_id is None:
            raise refusal_error(decision)
        params = {"from_host": record.host_id, "to_host": decision.host_id, "from_state": record.state}
        try:
            with self.store.transaction():
                op = self.store.insert_operation(
                    kind="move",
                    vm=name,
                    host_id=record.host_id,
                    params=params,
                    deadline=time.time() + self.vms.settings.operation_timeout_s,
                )
                self.store.update_vm(name, op_id=op.op_id, migrating_to=decision.host_id, error="")
        except BaseException:
            self.fleet_state.release(name, decision.host_id)
            raise
        self.events.emit(
            "vm.move",
            f"move stopped vm {name}: {record.host_id} -> {decision.host_id}",
            vm=name,
            op_id=op.op_id,
        )
        self.operations.start(op)
        return op

    async def _run_move(self, op: OperationRecord) -> None:
        """A cold move: define on the destination, undefine on the source, then switch the record."""
        record = self.store.vm(op.vm)
        source, target = op.params["from_host"], op.params["to_host"]
        if record is None:
            self.fleet_state.release(op.vm, target)
            self.operations.finish(op, ok=False, error=f"vm {op.vm!r} disappeared before the move")
            return
        defined = await self.rpc.exchange(
            target, DefineVm(op_id=f"{op.op_id}:define", deadline=op.deadline, spec=record.spec, start=False)
        )
        if defined is None or not (defined.ok or defined.code == "vm_exists"):
            why = defined.error if defined is not None else f"host {target} did not answer"
            with self.store.transaction():
                self.store.update_vm(op.vm, op_id=None, migrating_to=None)
                self.fleet_state.release(op.vm, target)
                self.operations.finish(op, ok=False, error=f"{target} could not define it: {why}")
            return
        removed = await self.rpc.exchange(
            source, UndefineVm(op_id=f"{op.op_id}:undefine", deadline=op.deadline, vm=op.vm)
        )
        note = ""
        if removed is None or not (removed.ok or removed.code == "unknown_vm"):
            note = f"; the copy on {source} is removed when it reports it"
        with self.store.transaction():
            self.store.update_vm(op.vm, host_id=target, migrating_to=None, op_id=None, error="")
            self.fleet_state.release(op.vm, source)
            self.operations.finish(op, ok=True, error=note.lstrip("; "))

    def restart_elsewhere(self, name: str, failed_host: str, avoid: list[str]) -> OperationRecord | str:
        """Restart VM ``name`` of the fenced ``failed_host`` on another host its placement rules allow.

        Returns the restart operation, or why no host can take it.
        """
        record = self.store.vm(name)
        if record is None:
            return f"vm {name!r} no longer exists"
        request = placement.restart_request(self.store, record, avoid)
        decision = self.scheduler.select(request)
        if decision.refusal is not None or decision.host_id is None:
            return decision.refusal.message if decision.refusal else "no host"
        # Move the claim: off the failed host, onto the chosen one (no await in between).
        self.fleet_state.release(name, failed_host)
        self.scheduler.claim(decision, request)
        return self.vms.restart(record, decision.host_id, failed_host)
