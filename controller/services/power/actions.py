"""Carrying out a plan: power-ons first, then the migrations in waves, then standby.

:class:`PowerActions` checks every step again as it runs. A migration goes through
:meth:`controller.services.migration.migrate.MigrationService.start`, so the scheduler's hard
constraints hold, and a refusal is skipped and reported. A power-on that fails by every method
raises a ``power.alert`` and the next standby host is tried. A standby verifies the wake path
first; a host nobody could wake is never switched off. Each step's outcome is a
:class:`~controller.services.power.settings.StepResult` with a ``code`` callers branch on.

It may import ``controller.services.migration``, ``controller.services.operations``,
``controller.hardware``, ``controller.state``, ``controller.common`` and its package's ``settings``,
``standby``, ``tracking`` and ``view``.
"""

from __future__ import annotations

import asyncio
import time

from controller.common.errors import DomainError
from controller.hardware import FallbackExhausted, FallbackPower, PowerError
from controller.services.migration.migrate import MigrationService
from controller.services.operations import Operations
from controller.services.power.settings import PowerSettings
from controller.services.power.standby import StandbyMarks
from controller.services.power.tracking import PowerTracking
from controller.services.power.view import DEFAULT_MAX_W
from controller.state.events import EventHub
from controller.state.store import HostRecord, OperationRecord, Store
from protocols.rest import Plan, PlannedMove, PlanOutcome, StepResult


class PowerActions:
    """Executes plans and single power steps through the hosts' drivers and the migration service."""

    def __init__(
        self,
        *,
        store: Store,
        events: EventHub,
        operations: Operations,
        migrations: MigrationService,
        marks: StandbyMarks,
        tracking: PowerTracking,
        settings: PowerSettings,
    ) -> None:
        self.store = store
        self.events = events
        self.operations = operations
        self.migrations = migrations
        self.marks = marks
        self.tracking = tracking
        self.settings = settings

    async def execute(self, plan: Plan) -> PlanOutcome:
        """Carry out ``plan``: power-ons, then the moves whose target is on, then standby."""
        results: list[StepResult] = []
        tried: set[str] = set()
        for action in plan.power:
            if action.action == "power_on":
                await self.wake(action.host_id, action.reason, results, tried)
        ready: list[PlannedMove] = []
        for move in plan.moves:
            host = self.store.host(move.target)
            if host is None or not host.online or host.standby_since is not None:
                results.append(
                    StepResult(
                        kind="move",
                        subject=move.vm,
                        ok=False,
                        detail=f"deferred: {move.target} is not on yet; the move is planned again once its "
                        "agent reports in",
                        code="move_deferred",
                    )
                )
            else:
                ready.append(move)
        await self.migrate(ready, results)
        for action in plan.power:
            if action.action == "standby":
                results.append(await self.standby(action.host_id, action.reason))
        return PlanOutcome(plan=plan, results=results, finished_at=time.time())

    # -- migrations -------------------------------------------------------------------------------

    async def migrate(self, moves: list[PlannedMove], results: list[StepResult]) -> None:
        """Start ``moves`` in waves: at most ``per_host`` at once per host; wait for them all."""
        if not moves:
            return
        slots: dict[str, asyncio.Semaphore] = {}
        refused: set[str] = set()  # consolidation sources whose evacuation already failed

        def slot(host_id: str) -> asyncio.Semaphore:
            return slots.setdefault(host_id, asyncio.Semaphore(self.settings.per_host))

        async def one(move: PlannedMove) -> None:
            first, second = sorted((move.source, move.target))
            async with slot(first), slot(second):
                results.append(await self._move(move, refused))

        await asyncio.gather(*(one(move) for move in moves))

    async def _move(self, move: PlannedMove, refused: set[str]) -> StepResult:
        """Start one move and wait for it; ``refused`` collects consolidation sources that stay on."""
        if move.kind == "consolidate" and move.source in refused:
            return StepResult(
                kind="move",
                subject=move.vm,
                ok=False,
                detail=f"skipped: another move off {move.source} failed, so it stays on",
                code="move_skipped",
            )
        started = self._start(move)
        if isinstance(started, str):
            if move.kind == "consolidate":
                refused.add(move.source)
            self.events.emit(
                "power.move_skipped",
                f"{move.vm}: {move.source} -> {move.target} skipped: {started}",
                host_id=move.source,
                vm=move.vm,
            )
            return StepResult(
                kind="move", subject=move.vm, ok=False, detail=f"skipped: {started}", code="move_skipped"
            )
        op = started
        self.events.emit("power.move", move.reason, host_id=move.source, vm=move.vm, op_id=op.op_id)
        done = await self.operations.wait(op.op_id, self.settings.migration_timeout_s)
        code = ""
        if done.state == "succeeded":
            detail = f"moved {move.source} -> {move.target}"
        elif done.state == "running":
            detail, code = f"still migrating after {self.settings.migration_timeout_s:g}s", "move_timeout"
        else:
            detail, code = f"failed, it stays on {move.source}: {done.error}", "move_failed"
            if move.kind == "consolidate":
                refused.add(move.source)
        return StepResult(
            kind="move",
            subject=move.vm,
            ok=done.state == "succeeded",
            detail=detail,
            op_id=op.op_id,
            code=code,
        )

    def _start(self, move: PlannedMove) -> OperationRecord | str:
        """The started migration of ``move``, or why it may not start now."""
        why_not = self._why_not_now(move)
        if why_not is not None:
            return why_not
        try:
            return self.migrations.start(move.vm, move.target, self.settings.migration_policy)
        except DomainError as exc:
            return exc.message

    def _why_not_now(self, move: PlannedMove) -> str | None:
        """Why ``move`` may not start now (its VM moved within the cooldown, is busy, went away)."""
        record = self.store.vm(move.vm)
        if record is None:
            return "the VM was deleted"
        if record.host_id != move.source:
            return f"the VM is on {record.host_id} now, not {move.source}"
        if record.op_id is not None:
            return f"an operation is working on it ({record.op_id})"
        last = self.store.last_operation(move.vm, "migrate")
        if last is not None and time.time() - last.created_at < self.settings.cooldown_s:
            return (
                f"it moved {time.time() - last.created_at:.0f}s ago (cooldown {self.settings.cooldown_s:g}s)"
            )
        return None

    # -- power ------------------------------------------------------------------------------------

    async def wake(self, host_id: str, reason: str, results: list[StepResult], tried: set[str]) -> None:
        """Power ``host_id`` on; if every method fails, try the next standby host (most efficient first)."""
        tracking = self.tracking
        if host_id in tried or host_id in tracking.powering_on:
            return
        now = time.monotonic()
        spares = sorted(
            (
                h
                for h in self.store.hosts()
                if h.standby_since is not None
                and h.host_id != host_id
                and h.host_id not in tracking.powering_on
                and h.host_id not in tried
                and tracking.can_wake(h.host_id)
                and tracking.wake_failed.get(h.host_id, 0.0) <= now
                and not h.maintenance
            ),
            key=lambda h: (_efficiency(h), h.host_id),
        )
        for candidate in [host_id, *(h.host_id for h in spares)]:
            tried.add(candidate)
            why = reason if candidate == host_id else f"instead of {host_id}, whose power-on failed: {reason}"
            result = await self.power_on(candidate, why)
            results.append(result)
            if result.ok:
                return

    async def power_on(self, host_id: str, reason: str) -> StepResult:
        """Power ``host_id`` on by its methods; a failure by all of them raises a ``power.alert``."""
        driver = self.tracking.drivers.get(host_id)
        if driver is None or not driver.can_wake:
            return StepResult(
                kind="power_on",
                subject=host_id,
                ok=False,
                detail="no method can wake it",
                code="no_power_method",
            )
        try:
            await driver.power_on()
        except PowerError as exc:
            self.tracking.wake_failed[host_id] = time.monotonic() + self.settings.wake_retry_s
            detail = self.alert(host_id, _power_on_failure(host_id, exc))
            return StepResult(kind="power_on", subject=host_id, ok=False, detail=detail, code="power_failed")
        method = driver.last_used if isinstance(driver, FallbackPower) and driver.last_used else driver.method
        failed = driver.last_failures if isinstance(driver, FallbackPower) else []
        after = (
            " (after " + "; ".join(f"{f.method} failed: {f.reason}" for f in failed) + ")" if failed else ""
        )
        host = self.store.host(host_id)
        if host is not None and host.standby_since is not None:
            self.tracking.powering_on[host_id] = (time.monotonic(), method)
        detail = f"powered on via {method}{after}; waiting for its agent to report in"
        self.events.emit("power.on", f"{reason}: {detail}", host_id=host_id)
        return StepResult(kind="power_on", subject=host_id, ok=True, detail=detail)

    async def standby(self, host_id: str, reason: str) -> StepResult:
        """Verify the wake path, mark the host standby, then power it off (undone if that fails)."""
        tracking = self.tracking
        driver = tracking.drivers.get(host_id)
        if driver is None or not (driver.can_power_off and driver.can_wake):
            return StepResult(
                kind="standby",
                subject=host_id,
                ok=False,
                detail="no method can switch it",
                code="no_power_method",
            )
        check = await driver.verify_wake_path()
        if not check.ok:
            detail = (
                f"host {host_id} stays on: its wake path could not be verified, and a host nobody can wake "
                f"is never switched off ({check.detail})"
            )
            if host_id not in tracking.refused:
                tracking.refused.add(host_id)
                self.events.emit("power.standby_refused", detail, host_id=host_id)
            return StepResult(
                kind="standby", subject=host_id, ok=False, detail=detail, code="wake_path_unverified"
            )
        tracking.refused.discard(host_id)
        why_not = self._why_not_standby(host_id)
        if why_not is not None:
            return StepResult(
                kind="standby",
                subject=host_id,
                ok=False,
                detail=f"skipped: {why_not}",
                code="standby_skipped",
            )
        # No await between the check above and the mark: nothing can be placed there in between.
        self.marks.mark(host_id)
        self.events.emit(
            "power.standby",
            f"{reason}; wake path verified ({check.method}); powering it off",
            host_id=host_id,
        )
        tracking.powering_off.add(host_id)
        try:
            await driver.power_off()
        except PowerError as exc:
            self.marks.unmark(host_id)
            detail = self.alert(
                host_id, f"host {host_id} could not be powered off, so it stays on and takes VMs again: {exc}"
            )
            return StepResult(kind="standby", subject=host_id, ok=False, detail=detail, code="power_failed")
        finally:
            tracking.powering_off.discard(host_id)
        return StepResult(kind="standby", subject=host_id, ok=True, detail=f"powered off via {driver.method}")

    def _why_not_standby(self, host_id: str) -> str | None:
        host = self.store.host(host_id)
        if host is None:
            return "the host is gone"
        if host.standby_since is not None:
            return "it is in standby already"
        if host.maintenance:
            return "it is in maintenance"
        used = self.store.usage().get(host_id)
        if used is not None and used.vms:
            return f"it holds {used.vms} VM(s) now"
        return None

    def alert(self, host_id: str, message: str) -> str:
        """Announce a power failure of ``host_id`` (a ``power.alert`` event); returns ``message``."""
        self.events.emit("power.alert", message, host_id=host_id)
        return message


def _efficiency(host: HostRecord) -> float:
    caps = host.capabilities
    top = caps.power_max_w if caps.power_max_w > 0 else DEFAULT_MAX_W
    return top / max(1, caps.cores)


def _power_on_failure(host_id: str, exc: PowerError) -> str:
    """The alert for a power-on that failed by every method: each method's error and what to check."""
    failures = exc.failures if isinstance(exc, FallbackExhausted) else [exc]
    each = "; ".join(f"[{f.method} {f.target}] {f.reason} (check: {f.fix})" for f in failures)
    return f"host {host_id} could not be powered on by any of its methods: {each}"
