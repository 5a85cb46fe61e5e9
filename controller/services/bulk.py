"""Bulk actions: one action on every host or VM a selector picks, as one parent operation.

``POST /api/v1/actions`` starts one (:meth:`BulkActions.start`). The parent (kind ``bulk``) keeps the
action, the targets the selector picked when it started, and each target's result as it settles.
Each target's own operation is a child: the VM service or the migration service creates it as it
would for a single request, inside :meth:`Store.parent <controller.state.store.Store.parent>`, so it
names the parent (``GET /operations?parent=ID``). At most ``max_parallel`` children run at once.

- **Errors:** by default every target is tried; ``stop_after`` N ends the action once N have failed,
  and the targets not started yet are reported as skipped.
- **Cancel:** targets not started are skipped; children under way end as they would, except live
  migrations still in pre-copy, which are cancelled (the VM stays on its source).
- **Restart:** a running parent resumes: settled targets are not touched again, a child under way is
  waited for (found by its parent id, so none is started twice), the rest start.
- **Host actions** have no child: ``maintenance`` (on or off) and ``label`` (set or remove operator
  labels) change the host record at once; ``power`` (on, or off into standby: an empty host only)
  goes through the power service's drivers and checks, as ``host power`` does.
- **Labels on VMs** (``label`` with kind ``vm``) have no child either: a VM's labels are metadata in
  the store (:mod:`controller.services.labels`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, get_args

import msgspec

from controller.common import selectors
from controller.common.errors import DomainError, Invalid
from controller.services.hosts import HostService
from controller.services.migration.migrate import MigrationService
from controller.services.operations import Operations
from controller.services.selection import select_hosts, select_vms
from controller.services.vms import VmService
from controller.state.events import EventHub
from controller.state.store import OperationRecord, Store
from protocols.migration import MigrationPolicy

Action = Literal[
    "start", "stop", "pause", "resume", "reboot", "delete", "migrate", "maintenance", "label", "power"
]
VM_ACTIONS = frozenset({"start", "stop", "pause", "resume", "reboot", "delete", "migrate"})
Kind = Literal["vm", "host"]


def target_kind(action: str, kind: str | None) -> Kind:
    """What ``action`` acts on: the lifecycle actions on VMs, maintenance and power on hosts, label on
    either (hosts unless ``kind`` says "vm").

    Raises:
        Invalid: ``kind`` does not fit the action.
    """
    own: Kind = "vm" if action in VM_ACTIONS else "host"
    if kind is None or kind == own or (action == "label" and kind in ("vm", "host")):
        return "vm" if kind == "vm" else own
    raise Invalid(
        "invalid_kind", f"action {action!r} acts on {own}s, not {kind}s; leave kind out or give {own!r}"
    )


#: How long one child may take before the parent records it as failed (it may still end later).
CHILD_TIMEOUT_S = 3600.0


class BulkActions:
    """Starts and drives bulk actions."""

    def __init__(
        self,
        store: Store,
        events: EventHub,
        operations: Operations,
        hosts: HostService,
        vms: VmService,
        migrations: MigrationService,
    ) -> None:
        self.store = store
        self.events = events
        self.operations = operations
        self.hosts = hosts
        self.vms = vms
        self.migrations = migrations
        #: The power service's operator action (host, "on" | "off"), set once that service exists.
        self.power_action: Callable[[str, Literal["on", "off"]], Awaitable[object]] | None = None
        operations.register(("bulk",), self.run, self._crashed)

    def targets(self, action: str, selector: str, kind: str | None = None) -> list[str]:
        """What ``selector`` picks for ``action`` (on ``kind``), in name order.

        Raises:
            Invalid: an unknown action, a kind that does not fit it, or a bad selector (pointing at
            the character).
        """
        if action not in get_args(Action):
            raise Invalid("invalid_action", f"action {action!r} is not one of: {', '.join(get_args(Action))}")
        if target_kind(action, kind) == "vm":
            chosen = select_vms(selectors.parse(selector, "vm"), self.store.vms())
            return sorted(v.name for v in chosen)
        return sorted(h.host_id for h in select_hosts(selectors.parse(selector, "host"), self.store.hosts()))

    def start(
        self, action: str, selector: str, *, max_parallel: int, stop_after: int, args: dict[str, Any]
    ) -> OperationRecord:
        """Begin ``action`` on what ``selector`` picks. Returns the parent operation.

        Raises:
            Invalid: a bad action, selector or limit, or a selector that picks nothing.
        """
        if not 1 <= max_parallel <= 100:
            raise Invalid("invalid_limit", f"max_parallel must be 1 to 100, got {max_parallel}")
        if stop_after < 0:
            raise Invalid("invalid_limit", f"stop_after must be 0 (never stop) or more, got {stop_after}")
        targets = self.targets(action, selector, args.get("kind"))
        if not targets:
            kind = "VMs" if target_kind(action, args.get("kind")) == "vm" else "hosts"
            raise Invalid(
                "nothing_selected",
                f"selector {selector!r} picks no {kind}; list them with the same selector to check it",
            )
        with self.store.transaction():
            op = self.store.insert_operation(
                kind="bulk",
                vm="",
                host_id=None,
                params={
                    "action": action,
                    "selector": selector,
                    "targets": targets,
                    "max_parallel": max_parallel,
                    "stop_after": stop_after,
                    "args": args,
                    "results": {},
                },
                deadline=time.time(),
            )
        self.events.emit(
            "bulk.started",
            f"{action} on {len(targets)} target(s) picked by {selector!r}, {max_parallel} at a time",
            op_id=op.op_id,
        )
        self.operations.start(op)
        return op

    async def cancel(self, op_id: str) -> OperationRecord:
        """Skip the targets not started yet, and cancel live migrations still in pre-copy.

        Raises:
            NotFound: no such operation. Conflict: not a running bulk action.
        """
        # The flag first: a child started after the loop below sees it and cancels itself.
        op, newly = self.operations.flag_cancelled(op_id, "bulk", "bulk action")
        if newly:
            self.events.emit(
                "bulk.cancelled",
                f"bulk {op.params['action']} cancelled: targets not started are skipped",
                op_id=op_id,
            )
            for child in self.store.children(op_id):
                if child.kind == "migrate" and child.state == "running":
                    await self._cancel_child(child)
        return op

    async def run(self, op: OperationRecord) -> None:
        params = op.params
        results: dict[str, str] = dict(params.get("results", {}))
        children = {c.vm or c.host_id or "": c for c in self.store.children(op.op_id)}
        on_vms = target_kind(params["action"], params["args"].get("kind")) == "vm"
        gate = asyncio.Semaphore(params["max_parallel"])
        lock = asyncio.Lock()

        async def record(target: str, outcome: str) -> None:
            async with lock:
                results[target] = outcome
                current = self.store.operation(op.op_id) or op
                self.store.update_operation(op.op_id, {**current.params, "results": dict(results)})
            self.events.emit(
                "bulk.progress",
                f"bulk {params['action']}: {len(results)}/{len(params['targets'])} settled; {target}: {outcome}",
                vm=target if on_vms else "",
                host_id="" if on_vms else target,
                op_id=op.op_id,
            )

        async def one(target: str) -> None:
            if target in results:
                return  # settled before a restart
            async with gate:
                child = children.get(target)
                if child is None:
                    why = self._skip_reason(op.op_id, results)
                    if why:
                        await record(target, f"skipped: {why}")
                        return
                    try:
                        begun = (
                            await self._power(op, target)
                            if params["action"] == "power"
                            else self._begin(op, target)
                        )
                    except DomainError as exc:
                        await record(target, f"failed: {exc.message}")
                        return
                    if isinstance(begun, str):
                        await record(target, begun)
                        return
                    child = begun
                if (
                    self.operations.cancelled(op.op_id)
                    and child.kind == "migrate"
                    and child.state == "running"
                ):
                    await self._cancel_child(child)
                done = await self.operations.wait(child.op_id, CHILD_TIMEOUT_S)
                if done.state == "running":
                    await record(
                        target, f"failed: still running after {CHILD_TIMEOUT_S:g}s (operation {done.op_id})"
                    )
                elif done.state == "succeeded":
                    await record(target, "done")
                else:
                    await record(target, f"failed: {done.error}")

        await asyncio.gather(*(one(t) for t in params["targets"]))
        self._report(op.op_id, results)

    def _skip_reason(self, op_id: str, results: dict[str, str]) -> str:
        current = self.store.operation(op_id)
        if current is None or current.params.get("cancelled"):
            return "cancelled before it started"
        stop_after = current.params.get("stop_after", 0)
        failed = sum(r.startswith("failed") for r in results.values())
        if stop_after and failed >= stop_after:
            return f"the action stopped after {failed} failure(s) (stop_after {stop_after})"
        return ""

    async def _cancel_child(self, child: OperationRecord) -> None:
        with contextlib.suppress(DomainError):  # past the switch-over, or over: it ends on its own
            await self.migrations.cancel(child.vm)

    async def _power(self, op: OperationRecord, target: str) -> str:
        """Power ``target`` on, or off into standby.

        Raises:
            DomainError: the host refuses (no power method, not empty, its wake path unverified).
        """
        assert self.power_action is not None, "the controller sets the power action at start"
        on = bool(op.params["args"].get("on", True))
        await self.power_action(target, "on" if on else "off")
        return "done: powered on" if on else "done: in standby"

    def _begin(self, op: OperationRecord, target: str) -> OperationRecord | str:
        """Start ``target``'s part: its child operation, or the result of a part that needs none (a
        host change made at once, a VM already where the action would take it).

        Raises:
            DomainError: the target refuses (busy, gone, no room), with why.
        """
        action, args = op.params["action"], op.params["args"]
        if action == "maintenance":
            on = bool(args.get("on", True))
            self.hosts.update(target, maintenance=on, force=bool(args.get("force")))
            return "done: in maintenance" if on else "done: out of maintenance"
        if action == "label":
            if args.get("kind") == "vm":
                self.vms.labels.update(target, args["labels"])
            else:
                self.hosts.update(target, labels=args["labels"])
            return "done: labelled"
        already = {"start": "running", "stop": "stopped", "pause": "paused"}.get(action)
        vm = self.vms.require(target)
        if already is not None and vm.state == already and vm.op_id is None:
            return f"done: already {already}"
        with self.store.parent(op.op_id):
            match action:
                case "start":
                    return self.vms.start(target)
                case "stop":
                    return self.vms.stop(
                        target, force=bool(args.get("force")), timeout_s=float(args.get("timeout_s", 30.0))
                    )
                case "pause":
                    return self.vms.pause(target)
                case "resume":
                    return self.vms.resume(target)
                case "reboot":
                    return self.vms.reboot(target)
                case "delete":
                    return self.vms.delete(target)
                case "migrate":
                    policy = msgspec.convert(args.get("policy") or {}, MigrationPolicy)
                    return self.migrations.start(target, args.get("to"), policy)
        raise AssertionError(action)

    def _report(self, op_id: str, results: dict[str, str]) -> None:
        op = self.store.operation(op_id)
        assert op is not None
        done = [t for t, r in results.items() if r == "done"]
        failed = {t: r for t, r in results.items() if r.startswith("failed")}
        skipped = [t for t, r in results.items() if r.startswith("skipped")]
        summary = (
            f"bulk {op.params['action']}: {len(done)} done, {len(failed)} failed, {len(skipped)} skipped"
        )
        if failed:
            summary += "; failed: " + "; ".join(
                f"{t} ({r.removeprefix('failed: ')[:200]})" for t, r in failed.items()
            )
        ok = not failed and not skipped
        self.store.finish_operation(op_id, "succeeded" if ok else "failed", "" if ok else summary[:4000])
        self.events.emit("operation.succeeded" if ok else "operation.failed", summary, op_id=op_id)

    def _crashed(self, op: OperationRecord, exc: Exception) -> None:
        self.store.finish_operation(
            op.op_id, "failed", f"the bulk action crashed: {type(exc).__name__}: {exc}"
        )
