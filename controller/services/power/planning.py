"""Planning a round: the migrations and power actions the fleet needs, each with a reason a person reads.

:class:`Planner` asks Fleetvisor's planner (:class:`~controller.balancer.planner.FleetvisorPolicy`)
for migrations on a :class:`~controller.services.power.view.FleetView`, explains each one (relief or
consolidation, and what it saves), keeps them within the round's budget, then adds the power rules'
actions: power-ons ahead of demand and standby of empty hosts. It changes nothing but the notes it
returns. It may import ``controller.balancer`` and its package's ``settings``, ``tracking`` and
``view``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from controller.balancer.overload import PredictiveDetector
from controller.balancer.planner import FleetvisorPolicy, FleetvisorSettings, MigrationCostModel
from controller.services.power.settings import PowerSettings
from controller.services.power.tracking import PowerTracking
from controller.services.power.view import FleetView, ViewHost
from controller.state.store import VmRecord
from protocols.rest import Plan, PlannedMove, PlannedPowerAction

MoveKind = Literal["relieve", "consolidate"]


def cores(mips: float, settings: PowerSettings) -> float:
    return mips / settings.mips_per_core


def gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def pct(share: float) -> str:
    return f"{share * 100:.0f}%"


@dataclass(slots=True)
class _Capacity:
    """What the plan keeps powered on as it adds power actions (MIPS, MiB), and what it has chosen."""

    cpu_on: float
    mem_on: float
    chosen: set[str] = field(default_factory=set)
    actions: list[PlannedPowerAction] = field(default_factory=list)

    def wake(self, host: ViewHost, reason: str) -> None:
        self.chosen.add(host.host_id)
        self.actions.append(PlannedPowerAction(host_id=host.host_id, action="power_on", reason=reason))


class Planner:
    """Computes a round's plan from a fleet view; see the package docstring for the rules."""

    def __init__(self, settings: PowerSettings, tracking: PowerTracking) -> None:
        self.settings = settings
        self.tracking = tracking

    def compute(self, view: FleetView, *, round_: int, mode: str) -> Plan:
        """The moves and power actions ``view`` needs, each with its reason; changes nothing."""
        settings = self.settings
        notes: list[str] = []
        detector = PredictiveDetector(z=1.0, window=6)
        moves, overloaded = self._migrations(view, detector, round_, notes)
        self._note_stuck(view, moves, overloaded, notes)
        moves = self._budget(moves, notes)
        demand_now = float(view.demand[0]) if view.demand.size else 0.0
        forecast = float(detector.upper_many(view.demand[None, :])[0]) if view.demand.size else 0.0
        power = self._power_actions(view, moves, overloaded, forecast, notes)
        on_mips = sum(h.mips for h in view.hosts if h.state == "on")
        summary = _summary(moves, power)
        summary += (
            f"; demand {cores(demand_now, settings):.1f} cores (forecast {cores(forecast, settings):.1f}) "
            f"on {cores(on_mips, settings):.0f} powered-on cores"
        )
        return Plan(
            round=round_,
            computed_at=time.time(),
            mode=mode,
            demand_cores=round(cores(demand_now, settings), 3),
            forecast_cores=round(cores(forecast, settings), 3),
            powered_on_cores=round(cores(on_mips, settings), 3),
            moves=moves,
            power=power,
            notes=notes,
            summary=summary,
        )

    def _planner_settings(self) -> FleetvisorSettings:
        s = self.settings
        return FleetvisorSettings(
            target_utilization=s.target,
            overload_utilization=s.overload,
            underload_utilization=s.underload,
            horizon_s=s.horizon_s,
            min_gain=s.min_gain,
            # The service freezes VMs in cooldown itself (marked as moved this round).
            cooldown_intervals=1,
            cost=MigrationCostModel(),
        )

    def _migrations(
        self, view: FleetView, detector: PredictiveDetector, round_: int, notes: list[str]
    ) -> tuple[list[PlannedMove], dict[str, float]]:
        """The planner's moves with reasons, and the hosts forecast overloaded (likely CPU share)."""
        overloaded: dict[str, float] = {}
        if not (view.hosts and view.vms):
            return [], overloaded
        likely = detector.lower_many(view.series) / view.fleet.host_mips
        for i, host in enumerate(view.hosts):
            if host.state == "on" and likely[i] > self.settings.overload:
                overloaded[host.host_id] = float(likely[i])
        frozen_index = {i for i, vm in enumerate(view.vms) if vm.name in view.frozen}
        policy = FleetvisorPolicy(
            settings=self._planner_settings(), last_moved=dict.fromkeys(frozen_index, round_)
        )
        raw = policy.plan(view.snapshot)
        return self._explain(view, raw, overloaded, notes), overloaded

    def _note_stuck(
        self, view: FleetView, moves: list[PlannedMove], overloaded: dict[str, float], notes: list[str]
    ) -> None:
        """Note each overloaded host nothing moves off, and why."""
        for host_id, share in sorted(overloaded.items()):
            if not any(m.source == host_id for m in moves):
                stuck = [vm.name for vm in view.vms if vm.host_id == host_id and vm.name in view.frozen]
                why = (
                    "its movable VMs fit nowhere and no standby host can be woken for them"
                    if not stuck
                    else f"{', '.join(stuck)} cannot move now"
                )
                notes.append(
                    f"{host_id} overloaded: forecast {pct(share)} > {pct(self.settings.overload)}, but nothing "
                    f"moves: {why}; add capacity or move VMs by hand"
                )

    def _explain(
        self, view: FleetView, raw: list[tuple[int, int]], overloaded: dict[str, float], notes: list[str]
    ) -> list[PlannedMove]:
        """The planner's migrations as moves with reasons; frozen VMs are left out (and noted)."""
        by_source: dict[str, list[tuple[VmRecord, ViewHost]]] = {}
        for vm_i, target_i in raw:
            vm = view.vms[vm_i]
            by_source.setdefault(vm.host_id or "", []).append((vm, view.hosts[target_i]))
        moves: list[PlannedMove] = []
        for source, group in by_source.items():
            kind: MoveKind = "relieve" if source in overloaded else "consolidate"
            frozen = [vm.name for vm, _ in group if vm.name in view.frozen]
            if frozen and kind == "consolidate":
                notes.append(
                    f"consolidating {source} is put off: "
                    + "; ".join(f"{n}: {view.frozen[n]}" for n in frozen)
                )
                continue
            for name in frozen:
                notes.append(f"{name} stays on {source}: {view.frozen[name]}")
            group = [(vm, target) for vm, target in group if vm.name not in view.frozen]
            if not group:
                continue
            if kind == "relieve":
                moves.extend(self._relief(source, group, overloaded[source]))
            else:
                moves.extend(self._consolidation(view, source, group))
        return moves

    def _relief(self, source: str, group: list[tuple[VmRecord, ViewHost]], share: float) -> list[PlannedMove]:
        head = f"{source} overloaded: forecast {pct(share)} > {pct(self.settings.overload)}"
        moves = []
        for n, (vm, target) in enumerate(group):
            which = "cheapest to move" if n == 0 else "still over the target"
            woken = " (in standby: powered on first)" if target.state != "on" else ""
            reason = (
                f"{head}, moving {vm.name} ({which}, {gib(vm.spec.memory_mib)}) to {target.host_id}{woken}"
            )
            moves.append(_move(vm, source, target, "relieve", reason))
        return moves

    def _consolidation(
        self, view: FleetView, source: str, group: list[tuple[VmRecord, ViewHost]]
    ) -> list[PlannedMove]:
        settings = self.settings
        src_i = view.host_index(source)
        assert src_i is not None
        src = view.hosts[src_i]
        load = float(view.series[src_i, 0]) / src.mips if src.mips else 0.0
        saved_kwh = self._saving_kwh(view, src_i, group) if view.fleet.hosts else 0.0
        horizon = "over an hour" if settings.horizon_s == 3600 else f"over {settings.horizon_s / 3600:g} h"
        head = (
            f"consolidate {source}: {pct(load)} load, saves {saved_kwh:.2f} kWh {horizon} "
            f"for {len(group)} migration(s)"
        )
        return [
            _move(vm, source, target, "consolidate", f"{head}; moving {vm.name} to {target.host_id}")
            for vm, target in group
        ]

    def _saving_kwh(self, view: FleetView, src_i: int, group: list[tuple[VmRecord, ViewHost]]) -> float:
        """Energy saved over the horizon by emptying host ``src_i`` as ``group`` says (the source off)."""
        fleet = view.fleet
        load = view.series[:, 0].copy()
        after = load.copy()
        vm_index = {vm.name: i for i, vm in enumerate(view.vms)}
        for vm, target in group:
            mips = float(view.snapshot.vm_requested[vm_index[vm.name]])
            after[src_i] -= mips
            t_i = view.host_index(target.host_id)
            assert t_i is not None
            after[t_i] += mips
        hosts = np.arange(fleet.hosts, dtype=np.intp)
        before_w = fleet.power(hosts, load / fleet.host_mips)
        after_w = fleet.power(hosts, np.maximum(after, 0.0) / fleet.host_mips)
        targets = np.flatnonzero(after != load)
        targets = targets[targets != src_i]
        # The source ends up off, so it saves its whole draw; the targets draw a little more.
        saved_w = float(before_w[src_i]) - float(np.sum(after_w[targets] - before_w[targets]))
        return max(0.0, saved_w) * self.settings.horizon_s / 3_600_000.0

    def _budget(self, moves: list[PlannedMove], notes: list[str]) -> list[PlannedMove]:
        """Relief first, then whole consolidations, within ``max_migrations_per_round``."""
        limit = self.settings.max_migrations_per_round
        kept = [m for m in moves if m.kind == "relieve"][:limit]
        for dropped in [m for m in moves if m.kind == "relieve"][limit:]:
            notes.append(f"{dropped.vm} waits for a later round (at most {limit} migrations per round)")
        groups: dict[str, list[PlannedMove]] = {}
        for move in moves:
            if move.kind == "consolidate":
                groups.setdefault(move.source, []).append(move)
        for source, group in groups.items():
            room = limit - len(kept)
            if len(group) <= room or (not kept and room > 0):
                kept.extend(group[:room])
                if len(group) > room:
                    notes.append(
                        f"consolidating {source} takes {len(group)} migrations, more than {limit} per round; "
                        f"{room} now, the rest in later rounds"
                    )
            else:
                notes.append(
                    f"consolidating {source} ({len(group)} migrations) waits for a later round "
                    f"(at most {limit} migrations per round)"
                )
        return kept

    # -- power actions ----------------------------------------------------------------------------

    def _power_actions(
        self,
        view: FleetView,
        moves: list[PlannedMove],
        overloaded: dict[str, float],
        forecast: float,
        notes: list[str],
    ) -> list[PlannedPowerAction]:
        """Power-ons (for moves, demand, spares), or in a quiet round standby of empty hosts."""
        standby = sorted(
            (h for h in view.hosts if h.state == "standby"), key=lambda h: (h.watts_per_mips, h.host_id)
        )
        plan = _Capacity(cpu_on=0.0, mem_on=0.0)
        self._wake_for_moves(view, moves, overloaded, plan)
        live = [h for h in view.hosts if h.state in ("on", "waking") or h.host_id in plan.chosen]
        plan.cpu_on = sum(h.mips for h in live)
        plan.mem_on = sum(h.memory_mib for h in live)
        self._wake_for_demand(view, standby, forecast, plan)
        targets = {m.target for m in moves}
        self._wake_for_spares(view, standby, targets, plan)
        if (
            plan.actions
            or any(h.state == "waking" for h in view.hosts)
            or any(m.kind == "relieve" for m in moves)
        ):
            return plan.actions
        # Standby: only in a quiet round, least efficient hosts first.
        sources = {m.source for m in moves}
        empty = [
            h
            for h in view.hosts
            if h.state == "on" and h.usage.vms == 0 and h.host_id not in targets and h.host_id not in sources
        ]
        candidates = self._standby_candidates(empty, notes)
        return self._standby_actions(view, candidates, len(empty), forecast, plan, notes)

    def _wake_for_moves(
        self, view: FleetView, moves: list[PlannedMove], overloaded: dict[str, float], plan: _Capacity
    ) -> None:
        by_id = {h.host_id: h for h in view.hosts}
        for move in moves:
            target = by_id[move.target]
            if target.state == "standby" and target.host_id not in plan.chosen:
                plan.wake(
                    target,
                    f"power on {target.host_id}: {move.source} overloaded (forecast "
                    f"{pct(overloaded.get(move.source, 0.0))} > {pct(self.settings.overload)}) and no powered-on "
                    f"host can take {move.vm}",
                )

    def _wake_for_demand(
        self, view: FleetView, standby: list[ViewHost], forecast: float, plan: _Capacity
    ) -> None:
        settings = self.settings
        headroom = settings.headroom
        claimed = view.claimed_memory_mib
        for host in standby:
            if host.host_id in plan.chosen:
                continue
            cpu_short = forecast > (1 - headroom) * plan.cpu_on
            mem_short = claimed > (1 - headroom) * plan.mem_on
            if not (cpu_short or mem_short):
                break
            if cpu_short:
                why = (
                    f"forecast demand {cores(forecast, settings):.1f} cores + {pct(headroom)} headroom exceeds "
                    f"the {cores(plan.cpu_on, settings):.1f} cores powered on"
                )
            else:
                why = (
                    f"{gib(claimed)} of memory claimed + {pct(headroom)} headroom exceeds the "
                    f"{gib(plan.mem_on)} powered on"
                )
            plan.wake(host, f"power on {host.host_id} (the most efficient in standby): {why}")
            plan.cpu_on += host.mips
            plan.mem_on += host.memory_mib

    def _wake_for_spares(
        self, view: FleetView, standby: list[ViewHost], targets: set[str], plan: _Capacity
    ) -> None:
        wanted = self.settings.spare_hosts
        empty_on = [
            h for h in view.hosts if h.state == "on" and h.usage.vms == 0 and h.host_id not in targets
        ] + [h for h in view.hosts if h.state == "waking" or h.host_id in plan.chosen]
        spares = len(empty_on)
        for host in standby:
            if spares >= wanted:
                break
            if host.host_id in plan.chosen:
                continue
            plan.wake(
                host, f"power on {host.host_id}: {spares} empty host(s) on, {wanted} spare host(s) wanted"
            )
            spares += 1

    def _standby_candidates(self, empty: list[ViewHost], notes: list[str]) -> list[tuple[ViewHost, int]]:
        """The empty hosts that may go to standby (least efficient first), with their empty rounds."""
        tracking = self.tracking
        now = time.monotonic()
        candidates = []
        for host in sorted(empty, key=lambda h: (-h.watts_per_mips, h.host_id)):
            rounds = tracking.empty_rounds.get(host.host_id, 0)
            if rounds < self.settings.idle_rounds:
                continue
            if not tracking.can_standby(host.host_id):
                method = tracking.drivers.get(host.host_id)
                how = (
                    "has no power method (add it to --bmc-config)"
                    if method is None
                    else f"cannot be both powered off and woken by {method.method}"
                )
                notes.append(f"{host.host_id} is empty but stays on: it {how}")
                continue
            held = tracking.held.get(host.host_id, 0.0)
            if held > now:
                notes.append(
                    f"{host.host_id} is empty but stays on for {held - now:.0f}s more: an operator powered it on"
                )
                continue
            candidates.append((host, rounds))
        return candidates

    def _standby_actions(
        self,
        view: FleetView,
        candidates: list[tuple[ViewHost, int]],
        spare_left: int,
        forecast: float,
        plan: _Capacity,
        notes: list[str],
    ) -> list[PlannedPowerAction]:
        """Standby for ``candidates`` in order, while the hosts left on keep their spares and headroom."""
        settings = self.settings
        headroom = settings.headroom
        claimed = view.claimed_memory_mib
        margin = headroom + settings.standby_margin
        cpu_on, mem_on = plan.cpu_on, plan.mem_on
        actions = plan.actions
        for host, rounds in candidates:
            if spare_left - 1 < settings.spare_hosts:
                notes.append(
                    f"{host.host_id} is empty but stays on as one of the {settings.spare_hosts} spare host(s)"
                )
                break
            cpu_left, mem_left = cpu_on - host.mips, mem_on - host.memory_mib
            if cpu_left <= 0:
                notes.append(f"{host.host_id} is empty but stays on: it is the last host on")
                break
            if forecast > (1 - margin) * cpu_left or claimed > (1 - margin) * mem_left:
                notes.append(
                    f"{host.host_id} is empty but stays on: without it the fleet would keep less than "
                    f"{pct(margin)} free (headroom {pct(headroom)} + margin {pct(settings.standby_margin)}) "
                    f"for {cores(forecast, settings):.1f} cores of forecast demand and {gib(claimed)} claimed"
                )
                break
            free_cpu = 1 - forecast / cpu_left if cpu_left else 0.0
            actions.append(
                PlannedPowerAction(
                    host_id=host.host_id,
                    action="standby",
                    reason=(
                        f"{host.host_id} standby: empty for {rounds} rounds; the {cores(cpu_left, settings):.0f} "
                        f"cores left on keep {pct(free_cpu)} free for the forecast demand "
                        f"(headroom {pct(headroom)}); {spare_left - 1} other empty host(s) stay on "
                        f"(spare_hosts {settings.spare_hosts})"
                    ),
                )
            )
            cpu_on, mem_on, spare_left = cpu_left, mem_left, spare_left - 1
        return actions


def _move(vm: VmRecord, source: str, target: ViewHost, kind: MoveKind, reason: str) -> PlannedMove:
    return PlannedMove(
        vm=vm.name,
        source=source,
        target=target.host_id,
        kind=kind,
        memory_mib=vm.spec.memory_mib,
        reason=reason,
    )


def _summary(moves: list[PlannedMove], power: list[PlannedPowerAction]) -> str:
    """What the plan does, counted (before its demand figures)."""
    parts = []
    relieve = sum(m.kind == "relieve" for m in moves)
    if relieve:
        parts.append(f"{relieve} relief move(s)")
    if len(moves) - relieve:
        parts.append(f"{len(moves) - relieve} consolidation move(s)")
    for action, word in (("power_on", "power-on(s)"), ("standby", "standby")):
        count = sum(p.action == action for p in power)
        if count:
            parts.append(f"{count} {word}")
    return ", ".join(parts) if parts else "nothing to do"
