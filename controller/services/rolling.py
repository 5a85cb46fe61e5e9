"""Rolling maintenance: the hosts a selector picks go through maintenance in turn, a wave at a time.

``POST /api/v1/rolling-maintenance`` starts one (kind ``rolling``; docs/operations.md). Each wave
(``max_parallel`` hosts) goes through these phases, kept per host in the operation's ``progress``:

1. ``evacuating``: the wave's hosts enter maintenance (nothing new is placed there), then every
   running or paused VM on them is planned as a whole by the batch planner, affinity groups and HA
   room included, and each plan is held as a claim on its target before the first migration
   starts. Targets are tried in tiers: first hosts outside the roll or already done (a VM put there
   never moves again), then any other host. The migrations are children of the roll
   (``GET /operations?parent=ID``), at most ``per_host`` at once off each host. Stopped VMs stay.
2. ``step``: the operator's work. The API waits for ``POST /operations/{id}/continue`` naming the
   host (the CLI's ``--exec CMD`` runs the command, then calls it); ``ok: false`` fails the host.
   With ``step: none`` there is no wait.
3. ``agent``: wait until the host's agent is online and healthy again, with fresh telemetry; a new
   agent version is reported.
4. The host leaves maintenance. With ``return_vms``, the VMs that left it migrate back, when their
   rules still allow it (``returning``); a refusal leaves the VM where it is and says why.

A host that fails (a VM cannot leave, its step failed, its agent did not come back) stays in
maintenance and stops the roll: the hosts after it are skipped, nothing else is touched. A cancel
stops the roll at the next phase boundary: migrations under way finish, none start, and the report
says where each host stopped. The operation is persistent: a restarted controller resumes each host
in its phase, waits for the migrations under way (found by their parent) and starts none twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from controller.common import selectors
from controller.common.errors import Conflict, DomainError, Invalid
from controller.scheduler import FleetState, PlacementRequest
from controller.scheduler.fleet_state import Claim
from controller.services.hosts import HostService
from controller.services.migration.migrate import MigrationService, MigrationSettings
from controller.services.operations import Operations
from controller.services.selection import select_hosts
from controller.state.events import EventHub
from controller.state.live import LiveState
from controller.state.store import OperationRecord, Store
from protocols.migration import MigrationPolicy, check_policy, policy_problems

log = logging.getLogger(__name__)

#: Phases a host goes through, in order; ``done``, ``failed``, ``skipped`` and ``cancelled`` end it.
PHASES = ("pending", "evacuating", "step", "agent", "returning", "done")
ENDED = frozenset({"done", "failed", "skipped", "cancelled"})
#: How long one migration may take before the roll records it as failed.
MIGRATION_TIMEOUT_S = 3600.0


class RollingMaintenance:
    """Starts and drives rolling maintenance operations."""

    def __init__(
        self,
        store: Store,
        events: EventHub,
        operations: Operations,
        hosts: HostService,
        migrations: MigrationService,
        fleet_state: FleetState,
        live: LiveState,
        health: Callable[[str], str],
        settings: MigrationSettings,
    ) -> None:
        self.store = store
        self.events = events
        self.operations = operations
        self.hosts = hosts
        self.migrations = migrations
        self.fleet_state = fleet_state
        self.live = live
        self.health = health
        self.settings = settings
        self._wake: dict[str, asyncio.Event] = {}
        operations.register(("rolling",), self.run, self._crashed)

    # -- what the API calls -----------------------------------------------------------------------

    def targets(self, selector: str) -> list[str]:
        """The hosts ``selector`` picks, in the order the roll takes them (name order).

        Raises:
            Invalid: a bad selector (pointing at the character), or one that picks no host.
        """
        chosen = sorted(
            h.host_id for h in select_hosts(selectors.parse(selector, "host"), self.store.hosts())
        )
        if not chosen:
            raise Invalid(
                "nothing_selected",
                f"selector {selector!r} picks no hosts; check it with `fleetvisor host list -l {selector!r}`",
            )
        return chosen

    def start(
        self,
        selector: str,
        *,
        max_parallel: int = 1,
        return_vms: bool = False,
        step: str = "continue",
        agent_timeout_s: float = 900.0,
        policy: MigrationPolicy | None = None,
    ) -> OperationRecord:
        """Begin the roll over what ``selector`` picks. Returns the operation.

        Raises:
            Invalid: a bad selector, limit, step or policy. Conflict: a selected host is offline or already in
                another roll, or the roll would leave no host for the rest.
        """
        if step not in ("continue", "none"):
            raise Invalid("invalid_step", f"step must be 'continue' or 'none', got {step!r}")
        if not 1 <= max_parallel <= 64:
            raise Invalid("invalid_limit", f"max_parallel must be 1 to 64, got {max_parallel}")
        if policy is not None and (problems := check_policy(policy)):
            raise Invalid("invalid_policy", policy_problems("rolling maintenance", problems))
        hosts = self.targets(selector)
        self._check_hosts(hosts, max_parallel)
        params = {
            "selector": selector,
            "hosts": hosts,
            "max_parallel": max_parallel,
            "return_vms": return_vms,
            "step": step,
            "agent_timeout_s": agent_timeout_s,
            "policy": msgspec.to_builtins(
                policy or MigrationPolicy(bandwidth_mib_s=self.settings.host_link_mib_s)
            ),
            "progress": {h: {"phase": "pending"} for h in hosts},
        }
        with self.store.transaction():
            op = self.store.insert_operation(
                kind="rolling", vm="", host_id=None, params=params, deadline=time.time()
            )
        waves = -(-len(hosts) // max_parallel)
        self.events.emit(
            "rolling.started",
            f"rolling maintenance of {len(hosts)} host(s) ({', '.join(hosts[:8])}"
            f"{', ...' if len(hosts) > 8 else ''}) in {waves} wave(s) of up to {max_parallel}"
            + (", VMs return afterwards" if return_vms else ""),
            op_id=op.op_id,
        )
        self.operations.start(op)
        return op

    def _check_hosts(self, hosts: Sequence[str], max_parallel: int) -> None:
        offline = [h for h in hosts if not self.hosts.require(h).online]
        if offline:
            raise Conflict(
                "host_offline",
                f"host(s) {', '.join(offline)} are offline: their VMs cannot be live-migrated off. Bring them "
                "back, evacuate a fenced host with `fleetvisor host evacuate`, or leave them out of the selector",
            )
        for running in self.store.running_operations():
            if running.kind == "rolling":
                taken = sorted(set(hosts) & set(running.params["hosts"]))
                if taken:
                    raise Conflict(
                        "busy",
                        f"host(s) {', '.join(taken)} are in rolling maintenance {running.op_id} already; "
                        "wait for it, or cancel it",
                    )
        placeable = [
            h for h in self.store.hosts() if h.online and not h.maintenance and h.standby_since is None
        ]
        if len(placeable) <= min(max_parallel, len(hosts)) and all(h.host_id in hosts for h in placeable):
            raise Conflict(
                "no_room",
                f"a wave of {min(max_parallel, len(hosts))} host(s) would leave no host to take their VMs "
                f"({len(placeable)} placeable host(s) in the fleet); lower --max-parallel or add hosts",
            )

    def proceed(self, op_id: str, host_id: str, ok: bool = True, message: str = "") -> OperationRecord:
        """The operator's step on ``host_id`` is over (``ok``), or failed (the host stays in maintenance).

        Raises:
            NotFound: no such operation. Conflict: not a running roll, or the host is not waiting for
                its step (the error says what it is doing).
        """
        op = self.operations.require(op_id)
        if op.kind != "rolling" or op.state != "running":
            raise Conflict("invalid_state", f"operation {op_id} is not a running rolling maintenance")
        progress = op.params["progress"].get(host_id)
        if progress is None:
            raise Conflict(
                "not_in_roll",
                f"host {host_id!r} is not in rolling maintenance {op_id} ({', '.join(op.params['hosts'])})",
            )
        if progress["phase"] != "step":
            raise Conflict(
                "not_waiting",
                f"host {host_id!r} is not waiting for its step in {op_id}: it is {progress['phase']}; "
                "continue it once `fleetvisor op show` says it waits",
            )
        if ok:
            op = self._set(op_id, host_id, phase="agent", step_message=message)
            self._emit(op_id, host_id, f"step done{': ' + message if message else ''}; waiting for its agent")
        else:
            why = f"its step failed: {message or 'the operator said so'}"
            op = self._set(op_id, host_id, phase="failed", error=why)
            self._emit(op_id, host_id, f"{why}; it stays in maintenance and the roll stops")
        self._nudge(op_id)
        return op

    def cancel(self, op_id: str) -> OperationRecord:
        """Stop the roll at the next phase boundary: migrations under way finish, nothing new starts.

        Raises:
            NotFound: no such operation. Conflict: not a running roll.
        """
        op, newly = self.operations.flag_cancelled(op_id, "rolling", "rolling maintenance")
        if newly:
            self.events.emit(
                "rolling.cancelled",
                "rolling maintenance cancelled by the operator: migrations under way finish, the rest stop",
                op_id=op_id,
            )
        self._nudge(op_id)
        return op

    # -- the roll -----------------------------------------------------------------------------------

    async def run(self, op: OperationRecord) -> None:
        self._wake.setdefault(op.op_id, asyncio.Event())
        hosts: list[str] = op.params["hosts"]
        size: int = op.params["max_parallel"]
        try:
            for first in range(0, len(hosts), size):
                wave = [h for h in hosts[first : first + size] if self._phase(op.op_id, h) not in ENDED]
                stop = self._stop_reason(op.op_id)
                if stop:
                    for host in wave:
                        self._set(op.op_id, host, phase="skipped", error=stop)
                    continue
                if wave:
                    await self._wave(op.op_id, wave)
        finally:
            self._wake.pop(op.op_id, None)
        self._report(op.op_id)

    async def _wave(self, op_id: str, wave: list[str]) -> None:
        fresh = [h for h in wave if self._phase(op_id, h) == "pending"]
        already = {h for h in fresh if self.hosts.require(h).maintenance}
        for host in fresh:
            try:
                self.hosts.update(host, maintenance=True)
            except DomainError as exc:
                self._fail(op_id, host, f"it cannot enter maintenance: {exc.message}")
        fresh = [h for h in fresh if self._phase(op_id, h) == "pending"]
        held: list[Claim] = []
        try:
            if fresh:
                plans, why = self._plan(op_id, fresh, held)
                for host in fresh:
                    if why:
                        # Nothing moved: the host goes back as it was, so the refusal changes nothing.
                        if host not in already:
                            self.hosts.update(host, maintenance=False)
                        self._set(op_id, host, phase="failed", error=why)
                        self._emit(op_id, host, f"failed: {why}; nothing moved, and it is back as it was")
                    else:
                        self._set(op_id, host, phase="evacuating", plan=plans[host], moved={},
                                  agent_version=self.hosts.require(host).agent_version)  # fmt: skip
                        self._emit(op_id, host, f"in maintenance; {len(plans[host])} VM(s) to move: "
                                   + (", ".join(f"{v} -> {t}" for v, t in plans[host].items()) or "none"))  # fmt: skip
            await asyncio.gather(
                *(self._host(op_id, h, held) for h in wave if self._phase(op_id, h) not in ENDED)
            )
        finally:
            for claim in held:
                self.fleet_state.release(claim.vm, claim.host_id)

    async def _host(self, op_id: str, host: str, held: list[Claim]) -> None:
        """Take ``host`` from its current phase to its end."""
        while (phase := self._phase(op_id, host)) not in ENDED:
            if self.operations.cancelled(op_id):
                self._set(op_id, host, phase="cancelled", error=f"cancelled while {phase}; "
                          + ("it is in maintenance" if phase != "returning" else "it left maintenance"))  # fmt: skip
                return
            if phase == "evacuating":
                await self._evacuate(op_id, host, held)
            elif phase == "step":
                await self._step(op_id, host)
            elif phase == "agent":
                await self._agent(op_id, host)
            elif phase == "returning":
                await self._return(op_id, host)
            else:
                raise AssertionError(f"host {host} in phase {phase!r}")

    def _plan(self, op_id: str, wave: list[str], held: list[Claim]) -> tuple[dict[str, dict[str, str]], str]:
        """Every running or paused VM of the wave on a target, planned as a whole; the claims stay in
        ``held`` until each migration starts. Returns host -> {vm: target}, or why it cannot be done.
        """
        op = self.store.operation(op_id)
        assert op is not None
        progress = op.params["progress"]
        vms = [v for h in wave for v in self.store.vms(h) if v.state in ("running", "paused")]
        roll = set(op.params["hosts"])
        settled = [
            h.host_id
            for h in self.store.hosts()
            if h.host_id not in roll or progress[h.host_id]["phase"] == "done"
        ]
        requests = {v.name: self.migrations.request(v, avoid=tuple(wave)) for v in vms}
        targets: dict[str, str] = {}
        for tier in (settled, None):
            left = [n for n in requests if n not in targets]
            batch = [r for r in (_in_tier(requests[n], tier) for n in left) if r is not None]
            if not batch:
                continue
            decision = self.migrations.scheduler.select_batch(batch)
            if not decision.ok:
                return {}, f"its VMs cannot all be placed elsewhere: {decision.message}"
            claims = self.migrations.scheduler.commit_batch(batch, decision)
            held.extend(c for c in claims if c is not None)
            targets.update({d.vm: d.host_id for d in decision.decisions if d.host_id is not None})
        plans: dict[str, dict[str, str]] = {h: {} for h in wave}
        for vm in vms:
            assert vm.host_id is not None
            plans[vm.host_id][vm.name] = targets[vm.name]
        return plans, ""

    async def _evacuate(self, op_id: str, host: str, held: list[Claim]) -> None:
        progress = self._progress(op_id, host)
        gate = asyncio.Semaphore(self.settings.per_host)
        children = {c.vm: c for c in self._running_children(op_id) if c.host_id == host}

        async def one(vm: str, target: str) -> None:
            async with gate:
                outcome = await self._move(op_id, vm, host, target, children.get(vm), held)
            if outcome:
                moved = {**self._progress(op_id, host).get("moved", {}), vm: outcome}
                self._set(op_id, host, moved=moved)
                self._emit(op_id, host, f"vm {vm}: {outcome}", vm=vm, kind="rolling.progress")

        await asyncio.gather(
            *(one(v, t) for v, t in progress["plan"].items() if v not in progress.get("moved", {}))
        )
        if self.operations.cancelled(op_id):
            return
        left = [v.name for v in self.store.vms(host) if v.state in ("running", "paused", "migrating")]
        if left:
            failed = {
                v: r
                for v, r in self._progress(op_id, host).get("moved", {}).items()
                if r.startswith("failed")
            }
            why = "; ".join(f"{v}: {r.removeprefix('failed: ')[:200]}" for v, r in failed.items())
            self._fail(op_id, host, f"it still runs {', '.join(left)}" + (f" ({why})" if why else ""))
            return
        stopped = [v.name for v in self.store.vms(host)]
        nxt = "step" if self._params(op_id)["step"] == "continue" else "agent"
        self._set(op_id, host, phase=nxt)
        self._emit(op_id, host, "evacuated" + (f" (stopped VMs stay: {', '.join(stopped)})" if stopped else "")
                   + ("; waiting for the operator's step: do the work, then "
                      f"`fleetvisor op continue {op_id} {host}`" if nxt == "step" else ""),
                   kind="rolling.step" if nxt == "step" else "rolling.host")  # fmt: skip

    async def _move(
        self, op_id: str, vm: str, source: str, target: str, child: OperationRecord | None, held: list[Claim]
    ) -> str:
        """Migrate ``vm`` off ``source`` to its planned ``target`` (a child under way is waited for).
        Returns the outcome, or "" when a cancel stopped it before it started.
        """
        if child is None:
            record = self.store.vm(vm)
            busy = self.store.operation(record.op_id) if record is not None and record.op_id else None
            if busy is not None:
                await self.operations.wait(busy.op_id, self.settings.settle_timeout_s)
                record = self.store.vm(vm)
            if record is None:
                return "deleted meanwhile"
            if record.host_id != source:
                return f"moved to {record.host_id} meanwhile"
            if self.operations.cancelled(op_id):
                return ""
            for claim in [c for c in held if c.vm == vm]:  # the plan's claim becomes the migration's
                held.remove(claim)
                self.fleet_state.release(claim.vm, claim.host_id)
            try:
                child = self._migrate(op_id, vm, target, avoid=(source,))
            except DomainError as exc:
                return f"failed: {exc.message}"
        done = await self.operations.wait(child.op_id, MIGRATION_TIMEOUT_S)
        after = self.store.vm(vm)
        if done.state == "succeeded" and after is not None:
            return f"moved to {after.host_id}"
        return f"failed: {done.error or done.state}"

    def _migrate(self, op_id: str, vm: str, target: str, avoid: tuple[str, ...]) -> OperationRecord:
        """A child migration of ``vm`` to ``target``; where that no longer fits, where the scheduler says.

        Raises:
            DomainError: no host can take it, with why.
        """
        policy = msgspec.convert(self._params(op_id)["policy"], MigrationPolicy)
        with self.store.parent(op_id):
            try:
                return self.migrations.start(vm, target, policy, avoid=avoid)
            except DomainError as exc:
                log.info(
                    "rolling %s: vm %s no longer fits %s (%s); asking the scheduler", op_id, vm, target, exc
                )
                return self.migrations.start(vm, None, policy, avoid=avoid)

    async def _step(self, op_id: str, host: str) -> None:
        while self._phase(op_id, host) == "step" and not self.operations.cancelled(op_id):
            await self._sleep(op_id, 5.0)

    async def _agent(self, op_id: str, host: str) -> None:
        """Wait until the agent is online and healthy with telemetry from after the step; leave maintenance."""
        since = time.monotonic()
        deadline = since + float(self._params(op_id)["agent_timeout_s"])
        while True:
            record = self.hosts.require(host)
            health = self.health(host)
            fresh = self.live.telemetry_seen.get(host, 0.0) > since
            if record.online and health == "up" and fresh:
                break
            if self.operations.cancelled(op_id):
                return
            if time.monotonic() > deadline:
                self._fail(op_id, host, f"its agent did not come back healthy within "
                           f"{self._params(op_id)['agent_timeout_s']:g}s (online: {record.online}, health: {health}, "
                           f"telemetry since the step: {'yes' if fresh else 'no'})")  # fmt: skip
                return
            await self._sleep(op_id, 0.5)
        before = self._progress(op_id, host).get("agent_version", "")
        if before and record.agent_version != before:
            self._emit(
                op_id, host, f"agent version {before} -> {record.agent_version}", kind="rolling.agent_version"
            )
        try:
            self.hosts.update(host, maintenance=False)
        except DomainError as exc:
            self._fail(op_id, host, f"it cannot leave maintenance: {exc.message}")
            return
        back = bool(self._params(op_id)["return_vms"])
        self._set(
            op_id, host, phase="returning" if back else "done", agent_version_after=record.agent_version
        )
        self._emit(op_id, host, "healthy; out of maintenance" + ("; its VMs return" if back else ""))

    async def _return(self, op_id: str, host: str) -> None:
        """Migrate the VMs that left ``host`` back to it, where their rules still allow it."""
        progress = self._progress(op_id, host)
        gate = asyncio.Semaphore(self.settings.per_host)
        children = {c.vm: c for c in self._running_children(op_id) if c.params.get("to_host") == host}

        async def one(vm: str) -> None:
            async with gate:
                outcome = await self._back(op_id, vm, host, children.get(vm))
            returned = {**self._progress(op_id, host).get("returned", {}), vm: outcome}
            self._set(op_id, host, returned=returned)
            self._emit(op_id, host, f"vm {vm}: {outcome}", vm=vm, kind="rolling.progress")

        moved = progress.get("moved", {})
        gone = [
            v for v, r in moved.items() if r.startswith("moved to") and v not in progress.get("returned", {})
        ]
        await asyncio.gather(*(one(v) for v in gone))
        if not self.operations.cancelled(op_id):
            self._set(op_id, host, phase="done")

    async def _back(self, op_id: str, vm: str, host: str, child: OperationRecord | None) -> str:
        if child is None:
            record = self.store.vm(vm)
            if record is None:
                return "not returned: deleted meanwhile"
            if record.host_id == host:
                return "back"
            if record.op_id is not None or record.state not in ("running", "paused"):
                return f"stays on {record.host_id}: it is {record.state}" + (
                    " and busy" if record.op_id else ""
                )
            try:
                with self.store.parent(op_id):
                    policy = msgspec.convert(self._params(op_id)["policy"], MigrationPolicy)
                    child = self.migrations.start(vm, host, policy)
            except DomainError as exc:
                return f"stays on {record.host_id}: {exc.message}"
        done = await self.operations.wait(child.op_id, MIGRATION_TIMEOUT_S)
        return (
            "back" if done.state == "succeeded" else f"stays: the return failed: {done.error or done.state}"
        )

    # -- the record -----------------------------------------------------------------------------------

    def _params(self, op_id: str) -> dict[str, Any]:
        op = self.store.operation(op_id)
        assert op is not None
        return op.params

    def _progress(self, op_id: str, host: str) -> dict[str, Any]:
        return dict(self._params(op_id)["progress"][host])

    def _phase(self, op_id: str, host: str) -> str:
        return str(self._progress(op_id, host)["phase"])

    def _set(self, op_id: str, host: str, **fields: Any) -> OperationRecord:
        """Update ``host``'s progress (read and written with no await between: atomic in the loop)."""
        params = self._params(op_id)
        progress = {**params["progress"], host: {**params["progress"][host], **fields}}
        return self.store.update_operation(op_id, {**params, "progress": progress})

    def _fail(self, op_id: str, host: str, why: str) -> None:
        self._set(op_id, host, phase="failed", error=why)
        self._emit(op_id, host, f"failed: {why}; it stays in maintenance and the roll stops")

    def _running_children(self, op_id: str) -> list[OperationRecord]:
        """The roll's migrations still under way (after a restart: the ones to wait for, not restart).
        A child that ended already shows in the VM's record, which is read again.
        """
        return [c for c in self.store.children(op_id) if c.kind == "migrate" and c.state == "running"]

    def _stop_reason(self, op_id: str) -> str:
        if self.operations.cancelled(op_id):
            return "cancelled before its wave"
        failed = [h for h, p in self._params(op_id)["progress"].items() if p["phase"] == "failed"]
        return f"the roll stopped: {', '.join(failed)} failed" if failed else ""

    def _emit(self, op_id: str, host: str, text: str, *, vm: str = "", kind: str = "rolling.host") -> None:
        self.events.emit(kind, f"rolling maintenance, host {host}: {text}", host_id=host, vm=vm, op_id=op_id)

    def _nudge(self, op_id: str) -> None:
        wake = self._wake.get(op_id)
        if wake is not None:
            wake.set()

    async def _sleep(self, op_id: str, seconds: float) -> None:
        wake = self._wake.setdefault(op_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)
        wake.clear()

    def _report(self, op_id: str) -> None:
        params = self._params(op_id)
        by_phase: dict[str, list[str]] = {}
        for host, p in params["progress"].items():
            by_phase.setdefault(p["phase"], []).append(host)
        moves = [c for c in self.store.children(op_id) if c.kind == "migrate" and c.state == "succeeded"]
        summary = (
            f"rolling maintenance of {len(params['hosts'])} host(s): "
            + ", ".join(f"{len(hosts)} {phase}" for phase, hosts in sorted(by_phase.items()))
            + f"; {len(moves)} migration(s)"
        )
        problems = [f"{h}: {p['phase']}: {p.get('error', '')}" for h, p in params["progress"].items()
                    if p["phase"] in ("failed", "skipped", "cancelled")]  # fmt: skip
        ok = not problems
        if problems:
            summary += "; " + "; ".join(problems)
        self.store.finish_operation(op_id, "succeeded" if ok else "failed", "" if ok else summary[:4000])
        self.events.emit("operation.succeeded" if ok else "operation.failed", summary, op_id=op_id)

    def _crashed(self, op: OperationRecord, exc: Exception) -> None:
        self.store.finish_operation(
            op.op_id, "failed", f"the rolling maintenance crashed: {type(exc).__name__}: {exc}"
        )


def _in_tier(request: PlacementRequest, tier: list[str] | None) -> PlacementRequest | None:
    """``request`` limited to ``tier`` (best effort: what does not fit there tries the next tier), or
    None when its pinned hosts leave nothing in the tier; ``None`` is the last tier, any host.
    """
    if tier is None:
        return request
    allowed = tuple(h for h in (request.hosts or tier) if h in tier and h not in request.avoid_hosts)
    if not allowed:
        return None
    return msgspec.structs.replace(request, hosts=allowed, best_effort=True)
