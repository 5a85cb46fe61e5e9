"""The power service: the round loop, what a round observes, the automation level and the status.

:class:`PowerService` wires its parts (:mod:`.tracking`, :mod:`.standby`, :mod:`.view`,
:mod:`.planning`, :mod:`.actions`, :mod:`.operator`, :mod:`.energy`) from the collaborators the
daemon hands it, and is the only object the daemon, the API and the tests hold. The daemon runs
:meth:`~PowerService.run_rounds` and :meth:`~PowerService.run_energy` as its own guarded tasks and
awaits :meth:`~PowerService.close` at shutdown. Only the package's ``__init__`` imports this module.
It may import ``controller.services.hosts``, ``controller.services.migration``,
``controller.services.operations``, ``controller.scheduler``, ``controller.hardware``,
``controller.state``, ``controller.common`` and the rest of its package.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

import msgspec

from controller.common.errors import Conflict
from controller.hardware import PowerDriver, power_driver
from controller.scheduler import CapacitySettings, FleetState
from controller.services.hosts import HostService
from controller.services.migration.migrate import MigrationService
from controller.services.operations import Operations
from controller.services.power.actions import PowerActions
from controller.services.power.energy import EnergyCounter
from controller.services.power.operator import OperatorPower
from controller.services.power.planning import Planner
from controller.services.power.settings import AUTOMATION_LEVELS, MODE_SETTING, PowerSettings
from controller.services.power.standby import StandbyMarks
from controller.services.power.tracking import PowerTracking
from controller.services.power.view import build_view
from controller.state.events import EventHub
from controller.state.live import LiveState, StandbyHosts
from controller.state.store import HostRecord, Store, Usage
from protocols.rest import (
    AutomationLevel,
    HostPower,
    HostPowerReport,
    Plan,
    PlannedMove,
    PlanOutcome,
    PowerStatus,
)

log = logging.getLogger(__name__)


class PowerService:
    """The live power and balance service; see :mod:`controller.services.power`."""

    def __init__(
        self,
        *,
        store: Store,
        events: EventHub,
        live: LiveState,
        fleet_state: FleetState,
        standby: StandbyHosts,
        hosts: HostService,
        operations: Operations,
        migrations: MigrationService,
        health: Callable[[str], str],
        capacity: CapacitySettings,
        settings: PowerSettings | None = None,
    ) -> None:
        """Take the collaborators; hosts in standby in the store are treated as in standby again.

        ``health`` gives a host's failure-detector state (``up``, ``suspect``...); ``capacity`` is the
        scheduler's, so the planner counts a host's memory as the scheduler does.

        Raises:
            ValueError: ``settings`` are inconsistent (each problem named).
        """
        settings = settings or PowerSettings()
        problems = settings.problems()
        if problems:
            raise ValueError("power settings: " + "; ".join(problems))
        self.store = store
        self._migrations = migrations
        self.events = events
        self.live = live
        self.health = health
        self.capacity = capacity
        self.settings = settings
        self.mode: AutomationLevel = self._initial_mode(settings.mode)
        self.drivers: dict[str, PowerDriver] = _build_drivers(settings)
        self._energy = EnergyCounter(store=store, live=live, drivers=self.drivers, settings=settings)
        self.meter = self._energy.meter
        self.round = 0
        #: The latest plan (computed each round in recommend and auto, on request in manual) and the
        #: outcome of the latest execution.
        self.plan: Plan | None = None
        self.last_outcome: PlanOutcome | None = None
        self._published: tuple[object, ...] | None = None
        self._tracking = PowerTracking(drivers=self.drivers, demand=deque(maxlen=settings.history))
        self._marks = StandbyMarks(
            store=store,
            events=events,
            live=live,
            fleet_state=fleet_state,
            standby=standby,
            tracking=self._tracking,
        )
        self._actions = PowerActions(
            store=store,
            events=events,
            operations=operations,
            migrations=migrations,
            marks=self._marks,
            tracking=self._tracking,
            settings=settings,
        )
        self._planner = Planner(settings, self._tracking)
        self._lock = asyncio.Lock()
        self._operator = OperatorPower(
            store=store,
            hosts=hosts,
            tracking=self._tracking,
            actions=self._actions,
            energy=self._energy,
            lock=self._lock,
            settings=settings,
        )
        for host in store.hosts():
            if host.standby_since is not None:
                # No boot is known as the standby one: if the previous controller stopped before the
                # power-off, the agent is still online, and the host counts as on again.
                self._marks.enter(host.host_id, "")

    # -- lifecycle --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Save the energy counters (the daemon has stopped the loops)."""
        self._energy.save()

    async def run_rounds(self) -> None:
        """Run a round every ``interval_s``, forever; a failed round is logged and the next one runs."""
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("power manager: round %d failed", self.round)

    async def run_energy(self) -> None:
        """Sample every host's energy every ``energy_interval_s`` (at most ``interval_s``), forever."""
        while True:
            try:
                await self.sample_energy()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("power manager: energy sampling failed")
            await asyncio.sleep(min(self.settings.energy_interval_s, self.settings.interval_s))

    async def tick(self) -> None:
        """One round: observe, and at ``recommend`` or ``auto`` plan (and at ``auto`` act)."""
        self.round += 1
        self._observe()
        if self.mode == "manual":
            return
        plan = self.compute_plan()
        if self.mode == "recommend":
            self._publish(plan)
        elif self.mode == "auto":
            async with self._lock:
                self.last_outcome = await self._actions.execute(plan)

    async def sample_energy(self) -> None:
        """One energy sample of every host: measured by its BMC where it can, else its power model."""
        await self._energy.sample()

    # -- observing --------------------------------------------------------------------------------

    def _observe(self) -> None:
        tracking = self._tracking
        now = time.monotonic()
        hosts = self.store.hosts()
        usage = self.store.usage()
        for host in hosts:
            h = host.host_id
            if (
                host.standby_since is not None
                and h not in tracking.powering_off
                and self._watch_standby(host, now)
            ):
                continue
            empty = usage.get(h, Usage()).vms == 0
            on = host.online and host.standby_since is None
            tracking.empty_rounds[h] = tracking.empty_rounds.get(h, 0) + 1 if (on and empty) else 0
        self._record_load(hosts)

    def _watch_standby(self, host: HostRecord, now: float) -> bool:
        """Notice a standby host whose agent came back (then True), or whose power-on timed out."""
        tracking = self._tracking
        h = host.host_id
        inventory = self.live.inventories.get(h)
        if host.online and inventory is not None and inventory.boot_id != tracking.standby_boot.get(h):
            self._marks.leave(h)
            return True
        started = tracking.powering_on.get(h)
        if started is not None and now - started[0] > self.settings.boot_timeout_s:
            del tracking.powering_on[h]
            tracking.wake_failed[h] = now + self.settings.wake_retry_s
            self._actions.alert(
                h,
                f"host {h} was powered on via {started[1]} {now - started[0]:.0f}s ago, but its agent "
                f"has not reported in within {self.settings.boot_timeout_s:g}s; check the host's "
                "console (did it boot?), its network, and that the fleetvisor agent service starts "
                "at boot. Another standby host is tried if capacity is still needed",
            )
        return False

    def _record_load(self, hosts: list[HostRecord]) -> None:
        """Add this round's CPU sample of every VM on a powered-on host, and the fleet's demand."""
        tracking = self._tracking
        settings = self.settings
        records = {vm.name: vm for vm in self.store.vms()}
        names = set()
        demand = 0.0
        for host in hosts:
            if not host.online or host.standby_since is not None:
                continue
            telemetry = self.live.telemetry.get(host.host_id)
            if telemetry is None:
                continue
            for vm in telemetry.vms:
                record = records.get(vm.name)
                if record is None or record.host_id != host.host_id:
                    continue  # a migration's leftover copy, or an incoming one
                names.add(vm.name)
                tracking.history.setdefault(vm.name, deque(maxlen=settings.history)).appendleft(vm.cpu_util)
                demand += vm.cpu_util * record.spec.vcpus * settings.mips_per_core
        tracking.demand.appendleft(demand)
        for name in list(tracking.history):
            if name not in names and name not in records:
                del tracking.history[name]

    # -- planning ---------------------------------------------------------------------------------

    def current_plan(self) -> Plan:
        """The latest plan while it is fresh (two intervals), else one computed now; changes nothing."""
        plan = self.plan
        if (
            plan is None
            or self.mode == "manual"
            or time.time() - plan.computed_at > 2 * self.settings.interval_s
        ):
            plan = self.compute_plan()
        return plan

    def compute_plan(self) -> Plan:
        """The moves and power actions the fleet needs now, each with its reason; changes nothing."""
        view = build_view(
            store=self.store,
            tracking=self._tracking,
            health=self.health,
            capacity=self.capacity,
            settings=self.settings,
            round_=self.round,
        )
        self.plan = self._vetted(self._planner.compute(view, round_=self.round, mode=self.mode))
        return self.plan

    def _vetted(self, plan: Plan) -> Plan:
        """``plan`` without the moves that would break a VM's placement rules (group, labels, pins),
        and without the standby of a host such a move was to empty; each is named in the notes.
        """
        kept: list[PlannedMove] = []
        notes = list(plan.notes)
        blocked: set[str] = set()
        for move in plan.moves:
            why = self._migrations.refusal(move.vm, move.target)
            if why is None:
                kept.append(move)
                continue
            blocked.add(move.source)
            notes.append(
                f"vm {move.vm} stays on {move.source}: moving it to {move.target} is refused ({why})"
            )
        if not blocked:
            return plan
        power = [p for p in plan.power if not (p.action == "standby" and p.host_id in blocked)]
        notes.extend(
            f"host {p.host_id} stays on: a VM it holds may not move"
            for p in plan.power
            if p.action == "standby" and p.host_id in blocked
        )
        return msgspec.structs.replace(plan, moves=kept, power=power, notes=notes)

    def _publish(self, plan: Plan) -> None:
        """Emit the plan as events when it differs from the one published last."""
        key = (
            tuple((m.vm, m.source, m.target) for m in plan.moves),
            tuple((p.host_id, p.action) for p in plan.power),
        )
        if key == self._published:
            return
        self._published = key
        events = self.events
        events.emit("power.plan", f"recommendation (round {plan.round}): {plan.summary}")
        for move in plan.moves:
            events.emit("power.recommend", move.reason, host_id=move.source, vm=move.vm)
        for action in plan.power:
            events.emit("power.recommend", action.reason, host_id=action.host_id)

    async def apply(self) -> PlanOutcome:
        """Execute the current recommendation once (levels manual and recommend).

        In ``recommend`` the plan of the latest round is used while it is fresh (two intervals);
        otherwise a plan is computed now. Every step is checked again as it runs.

        Raises:
            Conflict: at level ``auto``, where the service applies its plan by itself.
        """
        if self.mode == "auto":
            raise Conflict(
                "automation_auto",
                f"the power manager is at automation level auto and applies its plan every "
                f"{self.settings.interval_s:g}s itself; switch to recommend or manual "
                "(`fleetvisor power mode recommend`) to apply plans by hand",
            )
        async with self._lock:
            plan = self.plan
            fresh = plan is not None and time.time() - plan.computed_at <= 2 * self.settings.interval_s
            if self.mode != "recommend" or not fresh or plan is None:
                plan = self.compute_plan()
            self.last_outcome = await self._actions.execute(plan)
            return self.last_outcome

    # -- mode -------------------------------------------------------------------------------------

    def _initial_mode(self, configured: AutomationLevel | None) -> AutomationLevel:
        """The configured level, else the one last set at run time, else manual. A configured level
        that differs from the stored one replaces it, and the log says so.
        """
        stored = self.store.setting(MODE_SETTING)
        kept: AutomationLevel | None = stored if stored in AUTOMATION_LEVELS else None
        if configured is None:
            if kept is not None:
                log.info("power manager: automation level %s (set at run time, kept in the store)", kept)
            return kept or "manual"
        if kept is not None and kept != configured:
            log.info(
                "power manager: automation level %s from the configuration replaces %s, set at run time",
                configured,
                kept,
            )
        self.store.set_setting(MODE_SETTING, configured)
        return configured

    def set_mode(self, mode: AutomationLevel) -> None:
        """Switch the automation level (effective from the next round); a restarted controller keeps it
        unless its configuration names a level.
        """
        self.store.set_setting(MODE_SETTING, mode)
        if mode != self.mode:
            old, self.mode = self.mode, mode
            self._published = None
            self.events.emit("power.mode", f"power manager automation level: {old} -> {mode}")

    async def settle(self) -> None:
        """Wait until no plan, apply or operator power action is being carried out."""
        async with self._lock:
            pass

    # -- operator's requests and views -------------------------------------------------------------

    async def host_status(self, host_id: str) -> HostPowerReport:
        """What the host's power methods read now, and whether its wake path verifies.

        Raises:
            NotFound: unknown host. Conflict: no power method configured for it.
        """
        return await self._operator.host_status(host_id)

    async def host_action(self, host_id: str, action: Literal["on", "off"]) -> HostPowerReport:
        """An operator's power action, through the same drivers and checks as the service's own.

        ``off`` puts an empty host in standby (its wake path verified first); ``on`` powers a host on
        and keeps the service from putting it back in standby for ``operator_hold_s``.

        Raises:
            NotFound: unknown host. Conflict: no power method, the host is not empty, or its wake path
                does not verify. HardwareFailed: the power methods failed (an alert names each one's error).
        """
        return await self._operator.host_action(host_id, action)

    def host_power(self, host_id: str, record: HostRecord | None = None) -> HostPower:
        """The host's power state, methods and energy (``record``: the host's store row, if at hand)."""
        return self._operator.host_power(host_id, record)

    def status(self) -> PowerStatus:
        s = self.settings
        return PowerStatus(
            mode=self.mode,
            interval_s=s.interval_s,
            spare_hosts=s.spare_hosts,
            headroom=s.headroom,
            idle_rounds=s.idle_rounds,
            cooldown_s=s.cooldown_s,
            max_migrations_per_round=s.max_migrations_per_round,
            round=self.round,
            hosts=[self.host_power(h.host_id, h) for h in self.store.hosts()],
            last_outcome=self.last_outcome,
        )


def _build_drivers(settings: PowerSettings) -> dict[str, PowerDriver]:
    """Each host's power methods: its driver given directly, or else its BMC, then Wake-on-LAN."""
    drivers: dict[str, PowerDriver] = dict(settings.drivers)
    for host_id in sorted(set(settings.bmcs) | set(settings.wol)):
        if host_id in drivers:
            continue
        driver = power_driver(host_id, settings.bmcs.get(host_id), settings.wol.get(host_id))
        if driver is not None:
            drivers[host_id] = driver
    return drivers
