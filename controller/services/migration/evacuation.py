"""Host evacuation: every VM off a host, in waves: a running one by live migration, a stopped one by a
cold move of its definition, and (off a fenced host) an HA VM by an HA restart.

An evacuation (kind ``evacuate``) is a persistent operation that records each VM's outcome as it
settles, so a controller restart resumes it where it was: settled VMs are not moved again, and a
migration already under way is waited for. Waves stay within a per-host and a fleet-wide concurrency
limit (:class:`~controller.services.migration.migrate.MigrationSettings`).
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from controller.common.errors import Conflict, DomainError, Invalid
from controller.services.hosts import HostService
from controller.services.migration.migrate import MigrationService, MigrationSettings
from controller.services.moves import VmMoves
from controller.services.operations import Operations
from controller.services.vms import VmService
from controller.state.events import EventHub
from controller.state.store import OperationRecord, Store, VmRecord
from protocols.migration import MigrationPolicy, check_policy, policy_problems


class Evacuations:
    """Starts and drives host evacuations."""

    def __init__(
        self,
        store: Store,
        events: EventHub,
        operations: Operations,
        hosts: HostService,
        vms: VmService,
        moves: VmMoves,
        migrations: MigrationService,
        settings: MigrationSettings,
    ) -> None:
        self.store = store
        self.events = events
        self.operations = operations
        self.hosts = hosts
        self.vms = vms
        self.moves = moves
        self.migrations = migrations
        self.settings = settings
        operations.register(("evacuate",), self.evacuate, migrations.stalled)

    def start(self, host_id: str, policy: MigrationPolicy) -> OperationRecord:
        """Begin moving every running or paused VM off ``host_id``. Returns the operation.

        Raises:
            Invalid: a bad policy. NotFound: an unknown host. Conflict: an evacuation of it is already under way.
        """
        problems = check_policy(policy)
        if problems:
            raise Invalid("invalid_policy", policy_problems(f"evacuating {host_id!r}", problems))
        self.hosts.require(host_id)
        for running in self.store.running_operations():
            if running.kind == "evacuate" and running.host_id == host_id:
                raise Conflict(
                    "busy", f"host {host_id!r} is already being evacuated by operation {running.op_id}"
                )
        vms = [
            v.name
            for v in self.store.vms(host_id)
            if v.state in ("running", "paused", "migrating", "stopped", "crashed")
        ]
        with self.store.transaction():
            op = self.store.insert_operation(
                kind="evacuate",
                vm="",
                host_id=host_id,
                params={"policy": msgspec.to_builtins(policy), "vms": vms, "results": {}},
                deadline=time.time(),
            )
        self.events.emit(
            "host.evacuate",
            f"evacuating host {host_id}: {len(vms)} VM(s) to move",
            host_id=host_id,
            op_id=op.op_id,
        )
        self.operations.start(op)
        return op

    async def evacuate(self, op: OperationRecord) -> None:
        host_id = op.host_id
        assert host_id is not None
        policy = msgspec.convert(op.params["policy"], MigrationPolicy)
        per_host = asyncio.Semaphore(self.settings.per_host)
        results: dict[str, str] = dict(op.params.get("results", {}))
        lock = asyncio.Lock()

        async def record(name: str, outcome: str) -> None:
            nonlocal op
            async with lock:
                results[name] = outcome
                current = self.store.operation(op.op_id) or op  # a cancel may have changed its params
                op = self.store.update_operation(op.op_id, {**current.params, "results": dict(results)})
            self.events.emit(
                "host.evacuate.progress",
                f"evacuating {host_id}: {len(results)}/{len(op.params['vms'])} done; vm {name}: {outcome}",
                host_id=host_id,
                vm=name,
                op_id=op.op_id,
            )

        async def move(name: str) -> None:
            if name in results:
                return  # settled before a controller restart
            async with per_host:
                vm = self.store.vm(name)
                busy = self.store.operation(vm.op_id) if vm is not None and vm.op_id else None
                if busy is not None and busy.kind != "migrate":
                    await self.operations.wait(busy.op_id, self.settings.settle_timeout_s)
                    vm, busy = self.store.vm(name), None
                if vm is None or vm.host_id != host_id:
                    await record(name, f"moved to {vm.host_id}" if vm is not None else "deleted meanwhile")
                    return
                if busy is None and self.operations.cancelled(op.op_id):
                    await record(name, "cancelled: not started")
                    return
                if busy is None:  # else: a move already under way (resumed after a restart)
                    try:
                        busy = self._start_move(vm, host_id, policy)
                    except DomainError as exc:
                        await record(name, f"failed: {exc.message}")
                        return
                done = await self.operations.wait(busy.op_id, 10 * self.settings.send_timeout_s)
                after = self.store.vm(name)
                if done.state == "succeeded" and after is not None and after.host_id == host_id:
                    # Not evacuated: the operation waited for put it here (it was one moving it in),
                    # or another move brought it back meanwhile. Say so; never "moved to" this host.
                    await record(name, f"failed: it is on {host_id} again (after {done.kind} {done.op_id})")
                elif done.state == "succeeded" and after is not None:
                    how = {"restart": "restarted on", "move": "moved (stopped) to"}.get(done.kind, "moved to")
                    await record(name, f"{how} {after.host_id}")
                else:
                    await record(name, f"failed: {done.error}")

        await asyncio.gather(*(move(name) for name in op.params["vms"]))
        self._report(op, host_id, results)

    def cancel(self, op_id: str) -> OperationRecord:
        """Cancel a running evacuation: VMs not yet moving stay where they are, moves under way end as
        they would. Kept in the operation, so a controller restart honours it.

        Raises:
            NotFound: no such operation. Conflict: not a running evacuation.
        """
        op, newly = self.operations.flag_cancelled(op_id, "evacuate", "evacuation")
        if newly:
            self.events.emit(
                "host.evacuate.cancelled",
                f"evacuation of {op.host_id} cancelled by the operator: moves under way finish, the rest stay",
                host_id=op.host_id or "",
                op_id=op_id,
            )
        return op

    def _start_move(self, vm: VmRecord, host_id: str, policy: MigrationPolicy) -> OperationRecord:
        """The move that takes ``vm`` off ``host_id``: a live migration, a cold move of a stopped VM, or,
        off a fenced host, an HA restart.

        Raises:
            DomainError: the VM cannot leave (its rules, no room, or an unreachable host), with why.
        """
        unreachable = self.vms.unreachable(host_id)
        if unreachable is not None:
            host = self.store.host(host_id)
            if vm.spec.ha and host is not None and host.fenced_at is not None:
                started = self.moves.restart_elsewhere(vm.name, host_id, [host_id])
                if isinstance(started, str):
                    raise Conflict("no_valid_host", f"HA restart impossible: {started}")
                return started
            what = "it is not an HA VM" if not vm.spec.ha else "the host is not fenced (confirm-down)"
            raise Conflict("host_unreachable", f"not moved: {unreachable.split('. ')[0]}, and {what}")
        if vm.state in ("stopped", "crashed"):
            return self.moves.cold_move(vm.name, avoid=(host_id,))
        return self.migrations.start(vm.name, None, policy, avoid=(host_id,))

    def _report(self, op: OperationRecord, host_id: str, results: dict[str, str]) -> None:
        """End the evacuation with its per-VM report: what moved, what could not, what is left."""
        failed = {n: r for n, r in results.items() if r.startswith("failed")}
        skipped = [n for n, r in results.items() if r.startswith("cancelled")]
        left = [v.name for v in self.store.vms(host_id)]
        report = f"{len(results) - len(failed) - len(skipped)} moved, {len(failed)} failed" + (
            f"; still on {host_id}: {', '.join(left)}" if left else f"; {host_id} is empty"
        )
        if skipped:
            report = f"cancelled by the operator ({len(skipped)} not started); {report}"
        if failed:
            report += "; not moved: " + _grouped(failed)
        ok = not failed and not skipped
        self.store.finish_operation(op.op_id, "succeeded" if ok else "failed", report)
        self.events.emit(
            "operation.succeeded" if ok else "operation.failed",
            f"evacuate host {host_id}: {report}",
            host_id=host_id,
            op_id=op.op_id,
        )


def _grouped(failed: dict[str, str]) -> str:
    """The failures, each reason said once with the VMs it stopped (an evacuation with no possible
    target says so once, not once per VM).
    """
    by_reason: dict[str, list[str]] = {}
    for name, result in failed.items():
        reason = result.removeprefix("failed: ").replace(f"vm {name!r}", "it")
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names)} ({reason[:300]})" for reason, names in by_reason.items())
