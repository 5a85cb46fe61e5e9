"""Power management and load balancing on the live fleet: one loop that moves VMs and switches hosts.

The :class:`PowerManager` is the controller's single policy engine for both jobs, so nothing fights
it: every ``interval_s`` the same round decides relief migrations (a host is, or is about to be,
overloaded), consolidation migrations (a lightly loaded host can be emptied and the saving pays for
the moves) and power actions (put an empty host in standby, power a standby host on ahead of demand).

A round:

1. **Observe.** Read each host's latest telemetry and keep, per VM, its CPU use in the last
   ``history`` rounds; sum the fleet-wide demand; count how many rounds each host has been empty;
   notice standby hosts whose agent came back (a new ``boot_id``), and power-ons that never did.
2. **Plan** (levels ``recommend`` and ``auto``). Build the balancer's model from the live fleet
   (:class:`~controller.balancer.model.Fleet` and :class:`~controller.balancer.model.Snapshot`:
   ``mips_per_core`` MIPS per core, each VM's demand from its history) and ask Fleetvisor's planner
   (:class:`~controller.balancer.planner.FleetvisorPolicy`: predictive overload detection,
   hysteresis between ``underload`` and ``target``, the migration cost model, ``min_gain``) for
   migrations. Standby hosts are in the model as switched off, which the planner wakes only to
   relieve an overload no running host can take. VMs that moved within ``cooldown_s``, that are busy
   or that are not running are frozen. Then the power rules below add power actions, and every step
   gets a reason a person can read.
3. **Act** (level ``auto``, or once on ``POST /plan/apply``): power-ons first, then the migrations in
   waves (at most ``max_migrations_per_round`` per round and ``per_host`` at once per host), each
   through :meth:`controller.migration.MigrationManager.start`, so the scheduler's hard constraints
   (capacity, anti-affinity, labels, maintenance) hold; a refusal is skipped and reported. Standby
   actions come last.

Power rules:

- **Standby.** A host empty (no VM at all, not even a claim) for ``idle_rounds`` rounds goes to
  standby when it is not one of the ``spare_hosts`` empty hosts kept on, and the hosts left on keep
  ``headroom`` (plus ``standby_margin``, the hysteresis) of their CPU and memory free for the
  forecast demand. First its wake path is verified (:meth:`PowerDriver.verify_wake_path`: the BMC
  answers, the Wake-on-LAN MAC is sound); a host nobody could wake is never switched off. Then it is
  marked standby in the store (it survives a controller restart) and in the scheduler (not
  placeable), HA is told to leave it alone, and only then is it powered off.
- **Power on ahead of demand.** When the forecast fleet demand (a least-squares line through the
  recent demand plus one standard error, the planner's own predictor) or the claimed memory exceeds
  ``1 - headroom`` of what is powered on, when an overloaded host cannot be relieved by running
  hosts, or when fewer than ``spare_hosts`` empty hosts are on, the most power-efficient standby
  host is powered on. It leaves standby when its agent reports in (a new ``boot_id``); until then
  nothing is placed on it.
- **Fallback and alerts.** A host's methods are tried in order (IPMI, then Wake-on-LAN:
  :class:`~controller.power.FallbackPower`). When every method fails, a ``power.alert`` event names
  the host, each method's error and what to check, and the next standby host is tried. A power-on
  whose agent does not report within ``boot_timeout_s`` raises the same alert.

Energy: an :class:`~controller.power.EnergyMeter` counts each host's kWh since the controller
started, from the BMC's DCMI power reading where there is one, from the host's power model (its
reported ``power_idle_w``/``power_max_w`` at its telemetry CPU use) otherwise, and as 0 W in standby.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from controller.balancer.model import Fleet, Snapshot
from controller.balancer.overload import PredictiveDetector
from controller.balancer.planner import FleetvisorPolicy, FleetvisorSettings, MigrationCostModel
from controller.errors import ApiError
from controller.power import (
    BmcConfig,
    EnergyMeter,
    EnergySettings,
    FallbackExhausted,
    FallbackPower,
    IpmiDriver,
    LinearPowerModel,
    PowerDriver,
    PowerError,
    WakeOnLanDriver,
    WolConfig,
)
from controller.scheduler import FleetStateError
from controller.store import HostRecord, Usage, VmRecord
from protocols.migration import MigrationPolicy

if TYPE_CHECKING:
    from controller.fleet import FleetService

__all__ = [
    "AutomationLevel",
    "HostPower",
    "HostPowerReport",
    "HostPowerRequest",
    "ModeRequest",
    "Plan",
    "PlanOutcome",
    "PlannedMove",
    "PlannedPowerAction",
    "PowerManager",
    "PowerSettings",
    "PowerStatus",
    "StepResult",
    "WakeCheckView",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
AutomationLevel = Literal["manual", "recommend", "auto"]
AUTOMATION_LEVELS: tuple[AutomationLevel, ...] = ("manual", "recommend", "auto")
#: The store's setting that keeps the level set at run time.
MODE_SETTING = "power.mode"

#: Power model assumed for a host that reports none (``power_max_w`` 0), so the planner can still
#: weigh a consolidation; energy is never counted from it.
_DEFAULT_IDLE_W = 100.0
_DEFAULT_MAX_W = 250.0
#: Demand assumed for a VM with no telemetry yet, as a share of its vCPUs (the planner's own default).
_INITIAL_DEMAND = 0.25
#: CPU samples are rounded to this share of a vCPU before planning.
_QUANTUM = 0.05
#: How long a BMC that gave no DCMI power reading is left alone before it is asked again.
_DCMI_RETRY_S = 600.0


@dataclass(frozen=True, slots=True)
class PowerSettings:
    """Settings of the power manager; see the module docstring for what each rule does."""

    #: ``manual``: plan only when asked; ``recommend``: plan every round and publish; ``auto``: act.
    #: None: the level last set at run time (``fleetvisor power mode``, kept in the store), else manual.
    #: A level given here replaces the stored one.
    mode: AutomationLevel | None = None
    #: Seconds between rounds.
    interval_s: float = 30.0
    #: Empty hosts kept powered on, ready for new VMs.
    spare_hosts: int = 1
    #: Share of the powered-on CPU and memory kept free for the forecast demand.
    headroom: float = 0.2
    #: Extra free share a host's standby must leave on top of ``headroom`` (hysteresis: a host is not
    #: switched off on the very edge that would switch one on again).
    standby_margin: float = 0.1
    #: Rounds a host must have been empty before it may go to standby.
    idle_rounds: int = 3
    #: A VM never moves twice within this many seconds (any migration, the operator's included).
    cooldown_s: float = 600.0
    #: Migrations started per round, and at once per host (source or target).
    max_migrations_per_round: int = 4
    per_host: int = 2
    #: The planner's band: relieve a host whose likely forecast CPU is over ``overload``; place so that
    #: a host's forecast stays under ``target``; consider emptying hosts under ``underload``.
    overload: float = 0.85
    target: float = 0.75
    underload: float = 0.3
    #: Consolidate only when the energy saved over ``horizon_s`` is this multiple of the moves' price.
    min_gain: float = 1.0
    horizon_s: float = 3600.0
    #: Per-VM CPU samples (one per round) the forecasts see.
    history: int = 30
    #: The model's compute unit: MIPS of one core (a VM's demand is its CPU use times its vCPUs).
    mips_per_core: float = 1000.0
    #: How long a powered-on host's agent may take to report in before the power-on counts as failed.
    boot_timeout_s: float = 300.0
    #: A host whose power-on failed is not tried again for this long (another standby host is).
    wake_retry_s: float = 600.0
    #: After an operator powers a host on, the manager does not put it back in standby for this long.
    operator_hold_s: float = 3600.0
    #: How long a round waits for one of its migrations.
    migration_timeout_s: float = 600.0
    #: Seconds between energy samples (at most ``interval_s``).
    energy_interval_s: float = 5.0
    #: Seconds between saves of the energy counters (also saved when a host is first counted and when
    #: the controller stops; a crash loses at most this much counting).
    energy_save_s: float = 60.0
    energy: EnergySettings = field(default_factory=EnergySettings)
    #: The policy of the manager's migrations.
    migration_policy: MigrationPolicy = field(default_factory=MigrationPolicy)
    #: Each host's BMC (IPMI over LAN), Wake-on-LAN settings, and drivers given directly (sim power in
    #: tests). A host's methods are, in order: its direct driver, or else IPMI then Wake-on-LAN.
    bmcs: Mapping[str, BmcConfig] = field(default_factory=dict)
    wol: Mapping[str, WolConfig] = field(default_factory=dict)
    drivers: Mapping[str, PowerDriver] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What is wrong with these settings, for a person (empty when nothing is)."""
        out = []
        if self.mode is not None and self.mode not in AUTOMATION_LEVELS:
            out.append(f"mode {self.mode!r} is not one of {', '.join(AUTOMATION_LEVELS)}")
        if not self.interval_s > 0:
            out.append(f"interval_s must be positive, got {self.interval_s}")
        if self.spare_hosts < 0:
            out.append(f"spare_hosts must be 0 or more, got {self.spare_hosts}")
        if not 0 <= self.headroom < 1:
            out.append(f"headroom must be within 0..1 (a share of capacity), got {self.headroom}")
        if self.idle_rounds < 1:
            out.append(f"idle_rounds must be at least 1, got {self.idle_rounds}")
        if not 0 < self.underload < self.target <= self.overload:
            out.append(
                f"need 0 < underload < target <= overload, got {self.underload}, {self.target}, {self.overload}"
            )
        if self.max_migrations_per_round < 1 or self.per_host < 1:
            out.append("max_migrations_per_round and per_host must be at least 1")
        return out


# -- what the API shows -------------------------------------------------------------------------------


class PlannedMove(msgspec.Struct, frozen=True, kw_only=True):
    """One migration of a plan, and why."""

    vm: str
    source: str
    target: str
    #: ``relieve``: the source is (about to be) overloaded; ``consolidate``: the source is emptied.
    kind: Literal["relieve", "consolidate"]
    memory_mib: int
    reason: str


class PlannedPowerAction(msgspec.Struct, frozen=True, kw_only=True):
    """One power action of a plan, and why."""

    host_id: str
    action: Literal["power_on", "standby"]
    reason: str


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """A recommendation: the moves and power actions of one round, each with its reason."""

    round: int
    computed_at: float
    mode: str
    #: Fleet CPU demand now and its forecast for the next round, and the CPU powered on, in cores.
    demand_cores: float
    forecast_cores: float
    powered_on_cores: float
    moves: list[PlannedMove] = []
    power: list[PlannedPowerAction] = []
    #: What the plan leaves alone and why (cooldown, budget, a host nobody could wake...).
    notes: list[str] = []
    summary: str = ""


class StepResult(msgspec.Struct, frozen=True, kw_only=True):
    """What became of one step of an executed plan."""

    kind: Literal["move", "power_on", "standby"]
    subject: str
    ok: bool
    detail: str
    op_id: str | None = None


class PlanOutcome(msgspec.Struct, frozen=True, kw_only=True):
    plan: Plan
    results: list[StepResult]
    finished_at: float


class HostPower(msgspec.Struct, frozen=True, kw_only=True):
    """A host's power as the manager sees it."""

    host_id: str
    #: ``on``; ``standby`` (switched off by the manager); ``powering-on`` (waiting for its agent).
    state: Literal["on", "standby", "powering-on"]
    #: The host's power methods in order (``ipmi+wol``, ``sim``...), or None when it has none.
    method: str | None
    standby_since: float | None
    #: Energy counted since ``energy_since`` (kept across controller restarts, which are not counted),
    #: and where its latest sample came from.
    energy_kwh: float
    energy_source: str | None
    energy_since: float | None = None


class WakeCheckView(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    method: str
    detail: str


class HostPowerReport(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to an operator's power request."""

    host_id: str
    action: str
    #: The power state the host's methods read now (``on``, ``off``, ``unknown``).
    status: str
    power: HostPower
    detail: str
    wake_check: WakeCheckView | None = None


class PowerStatus(msgspec.Struct, frozen=True, kw_only=True):
    mode: str
    interval_s: float
    spare_hosts: int
    headroom: float
    idle_rounds: int
    cooldown_s: float
    max_migrations_per_round: int
    round: int
    hosts: list[HostPower]
    #: What became of the latest executed plan (at auto, or after ``POST /plan/apply``).
    last_outcome: PlanOutcome | None = None


class ModeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Switch the automation level."""

    mode: AutomationLevel


class HostPowerRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Power a host on, or put it in standby (``off``: it must be empty and its wake path verified)."""

    action: Literal["on", "off"]


# -- the round's model --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Host:
    record: HostRecord
    state: Literal["on", "standby", "waking"]
    mips: float
    memory_mib: float
    idle_w: float
    max_w: float
    usage: Usage

    @property
    def host_id(self) -> str:
        return self.record.host_id

    @property
    def watts_per_mips(self) -> float:
        return self.max_w / self.mips if self.mips else math.inf


@dataclass(slots=True)
class _View:
    """The live fleet in the balancer's terms, for one round."""

    hosts: list[_Host]
    vms: list[VmRecord]
    frozen: dict[str, str]  #: VMs that must not move now, and why
    fleet: Fleet
    snapshot: Snapshot
    series: FloatArray  #: per-host demand (MIPS), most recent first
    demand: FloatArray  #: fleet-wide demand (MIPS), most recent first
    claimed_memory_mib: float

    def host_index(self, host_id: str) -> int | None:
        for i, host in enumerate(self.hosts):
            if host.host_id == host_id:
                return i
        return None


def _cores(mips: float, settings: PowerSettings) -> float:
    return mips / settings.mips_per_core


def _gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def _pct(share: float) -> str:
    return f"{share * 100:.0f}%"


class PowerManager:
    """The live power and balance manager; see the module docstring. Owned by the fleet service."""

    def __init__(self, service: FleetService, settings: PowerSettings | None = None) -> None:
        settings = settings or PowerSettings()
        problems = settings.problems()
        if problems:
            raise ValueError("power settings: " + "; ".join(problems))
        self.service = service
        self.settings = settings
        self.mode: AutomationLevel = self._initial_mode(settings.mode)
        self.meter = EnergyMeter(settings.energy)
        #: When counting began for each host (kept in the store with its counters).
        self._energy_since: dict[str, float] = {}
        self._energy_saved = float("-inf")
        for saved in service.store.energy().values():
            self.meter.restore(saved.host_id, saved.joules)
            self._energy_since[saved.host_id] = saved.since
        self.drivers: dict[str, PowerDriver] = self._build_drivers(settings)
        self.round = 0
        #: The latest plan (computed each round in recommend and auto, on request in manual) and the
        #: outcome of the latest execution.
        self.plan: Plan | None = None
        self.last_outcome: PlanOutcome | None = None
        self._published: tuple[object, ...] | None = None
        self._history: dict[str, deque[float]] = {}
        self._demand: deque[float] = deque(maxlen=settings.history)
        self._empty_rounds: dict[str, int] = {}
        self._standby_boot: dict[str, str] = {}
        self._powering_on: dict[str, tuple[float, str]] = {}
        self._powering_off: set[str] = set()
        self._wake_failed: dict[str, float] = {}
        self._held: dict[str, float] = {}
        self._refused: set[str] = set()
        self._dcmi_next: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        for host in service.store.hosts():
            if host.standby_since is not None:
                # No boot is known as the standby one: if the previous controller stopped before the
                # power-off, the agent is still online, and the host counts as on again.
                self._enter_standby_state(host.host_id, "")

    @staticmethod
    def _build_drivers(settings: PowerSettings) -> dict[str, PowerDriver]:
        drivers: dict[str, PowerDriver] = dict(settings.drivers)
        for host_id in sorted(set(settings.bmcs) | set(settings.wol)):
            if host_id in drivers:
                continue
            chain: list[PowerDriver] = []
            if host_id in settings.bmcs:
                chain.append(IpmiDriver(settings.bmcs[host_id]))
            if host_id in settings.wol:
                chain.append(WakeOnLanDriver(host_id, settings.wol[host_id]))
            drivers[host_id] = chain[0] if len(chain) == 1 else FallbackPower(chain)
        return drivers

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._guard(self._rounds, "rounds"), name="power:rounds"),
            loop.create_task(self._guard(self._energy, "energy"), name="power:energy"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._save_energy()

    async def _guard(self, body: Callable[[], Awaitable[None]], name: str) -> None:
        """Run a long-lived loop; log if it ever ends or fails (it should not)."""
        try:
            await body()
            log.error("power manager: the %s loop returned; it should run until the controller stops", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("power manager: the %s loop failed", name)

    async def _rounds(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("power manager: round %d failed", self.round)

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
                self.last_outcome = await self._execute(plan)

    # -- observing ----------------------------------------------------------------------------------

    def _observe(self) -> None:
        s = self.service
        now = time.monotonic()
        hosts = s.store.hosts()
        usage = s.store.usage()
        for host in hosts:
            h = host.host_id
            if host.standby_since is not None and h not in self._powering_off:
                inventory = s.inventories.get(h)
                if host.online and inventory is not None and inventory.boot_id != self._standby_boot.get(h):
                    self._leave_standby(h)
                    continue
                started = self._powering_on.get(h)
                if started is not None and now - started[0] > self.settings.boot_timeout_s:
                    del self._powering_on[h]
                    self._wake_failed[h] = now + self.settings.wake_retry_s
                    self._alert(
                        h,
                        f"host {h} was powered on via {started[1]} {now - started[0]:.0f}s ago, but its agent "
                        f"has not reported in within {self.settings.boot_timeout_s:g}s; check the host's "
                        "console (did it boot?), its network, and that the fleetvisor agent service starts "
                        "at boot. Another standby host is tried if capacity is still needed",
                    )
            empty = usage.get(h, Usage()).vms == 0
            on = host.online and host.standby_since is None
            self._empty_rounds[h] = self._empty_rounds.get(h, 0) + 1 if (on and empty) else 0
        records = {vm.name: vm for vm in s.store.vms()}
        names = set()
        demand = 0.0
        for host in hosts:
            if not host.online or host.standby_since is not None:
                continue
            telemetry = s.telemetry.get(host.host_id)
            if telemetry is None:
                continue
            for vm in telemetry.vms:
                record = records.get(vm.name)
                if record is None or record.host_id != host.host_id:
                    continue  # a migration's leftover copy, or an incoming one
                names.add(vm.name)
                self._history.setdefault(vm.name, deque(maxlen=self.settings.history)).appendleft(vm.cpu_util)
                demand += vm.cpu_util * record.spec.vcpus * self.settings.mips_per_core
        self._demand.appendleft(demand)
        for name in list(self._history):
            if name not in names and name not in records:
                del self._history[name]

    # -- planning -----------------------------------------------------------------------------------

    def _planner_settings(self) -> FleetvisorSettings:
        s = self.settings
        return FleetvisorSettings(
            target_utilization=s.target,
            overload_utilization=s.overload,
            underload_utilization=s.underload,
            horizon_s=s.horizon_s,
            min_gain=s.min_gain,
            # The manager freezes VMs in cooldown itself (marked as moved this round).
            cooldown_intervals=1,
            cost=MigrationCostModel(),
        )

    def _view(self) -> _View:
        s = self.service
        settings = self.settings
        capacity = s.settings.scheduler.capacity
        usage = s.store.usage()
        now = time.monotonic()
        hosts: list[_Host] = []
        for record in s.store.hosts():
            h = record.host_id
            if record.maintenance:
                continue
            if record.standby_since is not None:
                if h in self._powering_on:
                    state: Literal["on", "standby", "waking"] = "waking"
                elif self._can_wake(h) and self._wake_failed.get(h, 0.0) <= now:
                    state = "standby"
                else:
                    continue
            elif record.online and s.ha.detector.state(h) == "up":
                state = "on"
            else:
                continue
            caps = record.capabilities
            idle_w, max_w = caps.power_idle_w, caps.power_max_w
            if max_w <= 0:
                idle_w, max_w = _DEFAULT_IDLE_W, _DEFAULT_MAX_W
            hosts.append(
                _Host(
                    record=record,
                    state=state,
                    mips=max(1, caps.cores) * settings.mips_per_core,
                    memory_mib=float(max(0, capacity.memory_mib(caps.memory_mib))),
                    idle_w=idle_w,
                    max_w=max(max_w, idle_w),
                    usage=usage.get(h, Usage()),
                )
            )
        index = {host.host_id: i for i, host in enumerate(hosts)}
        vms = [vm for vm in s.store.vms() if vm.host_id in index and hosts[index[vm.host_id]].state == "on"]
        frozen: dict[str, str] = {}
        moved = s.store.latest_operation_times("migrate", time.time() - settings.cooldown_s)
        for vm in vms:
            if vm.op_id is not None:
                frozen[vm.name] = f"an operation is working on it ({vm.op_id})"
            elif vm.state not in ("running", "paused"):
                frozen[vm.name] = f"it is {vm.state}"
            elif not self._history.get(vm.name):
                frozen[vm.name] = "no load measured yet"
            elif vm.name in moved:
                frozen[vm.name] = (
                    f"it moved {time.time() - moved[vm.name]:.0f}s ago (cooldown {settings.cooldown_s:g}s)"
                )
        # Power tables: one row per distinct linear model.
        kinds: dict[tuple[float, float], int] = {}
        host_kind = np.array(
            [kinds.setdefault((h.idle_w, h.max_w), len(kinds)) for h in hosts], dtype=np.intp
        )
        tables = np.array(
            [[idle + (top - idle) * i / 10 for i in range(11)] for idle, top in kinds] or [[0.0] * 11],
            dtype=np.float64,
        )
        host_mips = np.array([h.mips for h in hosts], dtype=np.float64)
        vm_mips = np.array([vm.spec.vcpus * settings.mips_per_core for vm in vms], dtype=np.float64)
        samples = [list(self._history.get(vm.name, ())) for vm in vms]
        length = max(1, min(settings.history, max((len(x) for x in samples), default=1)))
        history = np.zeros((len(vms), length), dtype=np.float64)
        for i, past in enumerate(samples):
            if not past:
                past = [_INITIAL_DEMAND]
            # Pad the old end with the oldest sample: zeros would read as a load that just rose.
            history[i, : len(past)] = past[:length]
            history[i, len(past) :] = past[-1]
        # Jitter smaller than a twentieth of a vCPU says nothing about load, but would decide ties
        # between equal hosts, and so flip the plan from round to round.
        history = np.round(history / _QUANTUM) * _QUANTUM
        vm_host = np.array([index[vm.host_id or ""] for vm in vms], dtype=np.intp)
        host_vms: list[list[int]] = [[] for _ in hosts]
        for v, host_i in enumerate(vm_host.tolist()):
            host_vms[host_i].append(v)
        requested = history[:, 0] * vm_mips if vms else np.zeros(0)
        load = np.bincount(vm_host, weights=requested, minlength=len(hosts)).astype(np.float64)
        on = np.array([h.state == "on" for h in hosts], dtype=bool)
        # The planner takes a host with zero load for a switched-off one.
        utilization = np.where(on, np.maximum(load / np.maximum(host_mips, 1.0), 1e-6), 0.0)
        fleet = Fleet(
            host_mips=host_mips,
            host_core_mips=host_mips.copy(),  # a VM's vCPUs may spread over all of a host's cores
            host_kind=host_kind,
            power_tables=tables,
            vm_mips=vm_mips,
            vm_ram_mb=np.array([vm.spec.memory_mib for vm in vms], dtype=np.float64),
            # Each host's schedulable RAM, as the scheduler counts it. A live host has no fixed count
            # of VM slots.
            host_ram_mb=float(max((h.memory_mib for h in hosts), default=0.0)),
            host_ram_each=np.array([h.memory_mib for h in hosts], dtype=np.float64),
            host_bw_kbit_s=float(2**40),
            vm_bw_kbit_s=1.0,
            interval_s=settings.interval_s,
        )
        snapshot = Snapshot(
            step=self.round,
            time_s=time.time(),
            fleet=fleet,
            vm_host=vm_host,
            host_vms=host_vms,
            vm_requested=requested,
            vm_history=history,
            history_length=length,
            host_utilization=utilization,
        )
        window = min(length, 6)
        series = np.zeros((len(hosts), window), dtype=np.float64)
        if vms:
            vm_series = history[:, :window] * vm_mips[:, None]
            np.add.at(series, vm_host, vm_series)
        demand = np.array(list(self._demand)[: max(1, window)] or [float(load.sum())], dtype=np.float64)
        return _View(
            hosts=hosts,
            vms=vms,
            frozen=frozen,
            fleet=fleet,
            snapshot=snapshot,
            series=series,
            demand=demand,
            claimed_memory_mib=float(sum(h.usage.memory_mib for h in hosts if h.state == "on")),
        )

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
        view = self._view()
        settings = self.settings
        notes: list[str] = []
        moves: list[PlannedMove] = []
        overloaded: dict[str, float] = {}
        detector = PredictiveDetector(z=1.0, window=6)
        if view.hosts and view.vms:
            likely = detector.lower_many(view.series) / view.fleet.host_mips
            for i, host in enumerate(view.hosts):
                if host.state == "on" and likely[i] > settings.overload:
                    overloaded[host.host_id] = float(likely[i])
            frozen_index = {i for i, vm in enumerate(view.vms) if vm.name in view.frozen}
            policy = FleetvisorPolicy(
                settings=self._planner_settings(), last_moved=dict.fromkeys(frozen_index, self.round)
            )
            raw = policy.plan(view.snapshot)
            moves = self._explain(view, raw, overloaded, notes)
        for host_id, share in sorted(overloaded.items()):
            if not any(m.source == host_id for m in moves):
                stuck = [vm.name for vm in view.vms if vm.host_id == host_id and vm.name in view.frozen]
                why = (
                    "its movable VMs fit nowhere and no standby host can be woken for them"
                    if not stuck
                    else f"{', '.join(stuck)} cannot move now"
                )
                notes.append(
                    f"{host_id} overloaded: forecast {_pct(share)} > {_pct(settings.overload)}, but nothing "
                    f"moves: {why}; add capacity or move VMs by hand"
                )
        moves = self._budget(moves, notes)
        demand_now = float(view.demand[0]) if view.demand.size else 0.0
        forecast = float(detector.upper_many(view.demand[None, :])[0]) if view.demand.size else 0.0
        power = self._power_actions(view, moves, overloaded, forecast, notes)
        on_mips = sum(h.mips for h in view.hosts if h.state == "on")
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
        summary = ", ".join(parts) if parts else "nothing to do"
        summary += (
            f"; demand {_cores(demand_now, settings):.1f} cores (forecast {_cores(forecast, settings):.1f}) "
            f"on {_cores(on_mips, settings):.0f} powered-on cores"
        )
        plan = Plan(
            round=self.round,
            computed_at=time.time(),
            mode=self.mode,
            demand_cores=round(_cores(demand_now, settings), 3),
            forecast_cores=round(_cores(forecast, settings), 3),
            powered_on_cores=round(_cores(on_mips, settings), 3),
            moves=moves,
            power=power,
            notes=notes,
            summary=summary,
        )
        self.plan = plan
        return plan

    def _explain(
        self, view: _View, raw: list[tuple[int, int]], overloaded: dict[str, float], notes: list[str]
    ) -> list[PlannedMove]:
        """The planner's migrations as moves with reasons; frozen VMs are left out (and noted)."""
        settings = self.settings
        fleet = view.fleet
        by_source: dict[str, list[tuple[VmRecord, _Host]]] = {}
        for vm_i, target_i in raw:
            vm = view.vms[vm_i]
            by_source.setdefault(vm.host_id or "", []).append((vm, view.hosts[target_i]))
        moves: list[PlannedMove] = []
        for source, group in by_source.items():
            src_i = view.host_index(source)
            assert src_i is not None
            src = view.hosts[src_i]
            kind: Literal["relieve", "consolidate"] = "relieve" if source in overloaded else "consolidate"
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
                head = f"{source} overloaded: forecast {_pct(overloaded[source])} > {_pct(settings.overload)}"
                for n, (vm, target) in enumerate(group):
                    which = "cheapest to move" if n == 0 else "still over the target"
                    woken = " (in standby: powered on first)" if target.state != "on" else ""
                    reason = (
                        f"{head}, moving {vm.name} ({which}, {_gib(vm.spec.memory_mib)}) to "
                        f"{target.host_id}{woken}"
                    )
                    moves.append(self._move(vm, source, target, kind, reason))
                continue
            load = float(view.series[src_i, 0]) / src.mips if src.mips else 0.0
            saved_kwh = self._saving_kwh(view, src_i, group) if fleet.hosts else 0.0
            horizon = (
                "over an hour" if settings.horizon_s == 3600 else f"over {settings.horizon_s / 3600:g} h"
            )
            head = (
                f"consolidate {source}: {_pct(load)} load, saves {saved_kwh:.2f} kWh {horizon} "
                f"for {len(group)} migration(s)"
            )
            for vm, target in group:
                moves.append(
                    self._move(vm, source, target, kind, f"{head}; moving {vm.name} to {target.host_id}")
                )
        return moves

    @staticmethod
    def _move(
        vm: VmRecord, source: str, target: _Host, kind: Literal["relieve", "consolidate"], reason: str
    ) -> PlannedMove:
        return PlannedMove(
            vm=vm.name,
            source=source,
            target=target.host_id,
            kind=kind,
            memory_mib=vm.spec.memory_mib,
            reason=reason,
        )

    def _saving_kwh(self, view: _View, src_i: int, group: list[tuple[VmRecord, _Host]]) -> float:
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

    def _can_wake(self, host_id: str) -> bool:
        driver = self.drivers.get(host_id)
        return driver is not None and driver.can_wake

    def _can_standby(self, host_id: str) -> bool:
        driver = self.drivers.get(host_id)
        return driver is not None and driver.can_wake and driver.can_power_off

    def _power_actions(
        self,
        view: _View,
        moves: list[PlannedMove],
        overloaded: dict[str, float],
        forecast: float,
        notes: list[str],
    ) -> list[PlannedPowerAction]:
        settings = self.settings
        headroom = settings.headroom
        now = time.monotonic()
        actions: list[PlannedPowerAction] = []
        chosen: set[str] = set()
        standby = sorted(
            (h for h in view.hosts if h.state == "standby"), key=lambda h: (h.watts_per_mips, h.host_id)
        )

        def wake(host: _Host, reason: str) -> None:
            chosen.add(host.host_id)
            actions.append(PlannedPowerAction(host_id=host.host_id, action="power_on", reason=reason))

        by_id = {h.host_id: h for h in view.hosts}
        for move in moves:
            target = by_id[move.target]
            if target.state == "standby" and target.host_id not in chosen:
                wake(
                    target,
                    f"power on {target.host_id}: {move.source} overloaded (forecast "
                    f"{_pct(overloaded.get(move.source, 0.0))} > {_pct(settings.overload)}) and no powered-on "
                    f"host can take {move.vm}",
                )
        live = [h for h in view.hosts if h.state in ("on", "waking") or h.host_id in chosen]
        cpu_on = sum(h.mips for h in live)
        mem_on = sum(h.memory_mib for h in live)
        claimed = view.claimed_memory_mib
        for host in standby:
            if host.host_id in chosen:
                continue
            cpu_short = forecast > (1 - headroom) * cpu_on
            mem_short = claimed > (1 - headroom) * mem_on
            if not (cpu_short or mem_short):
                break
            if cpu_short:
                why = (
                    f"forecast demand {_cores(forecast, settings):.1f} cores + {_pct(headroom)} headroom exceeds "
                    f"the {_cores(cpu_on, settings):.1f} cores powered on"
                )
            else:
                why = (
                    f"{_gib(claimed)} of memory claimed + {_pct(headroom)} headroom exceeds the "
                    f"{_gib(mem_on)} powered on"
                )
            wake(host, f"power on {host.host_id} (the most efficient in standby): {why}")
            cpu_on += host.mips
            mem_on += host.memory_mib
        targets = {m.target for m in moves}
        empty_on = [
            h for h in view.hosts if h.state == "on" and h.usage.vms == 0 and h.host_id not in targets
        ] + [h for h in view.hosts if h.state == "waking" or h.host_id in chosen]
        spares = len(empty_on)
        for host in standby:
            if spares >= settings.spare_hosts:
                break
            if host.host_id in chosen:
                continue
            wake(
                host,
                f"power on {host.host_id}: {spares} empty host(s) on, {settings.spare_hosts} spare host(s) wanted",
            )
            spares += 1
        if actions or any(h.state == "waking" for h in view.hosts) or any(m.kind == "relieve" for m in moves):
            return actions
        # Standby: only in a quiet round, least efficient hosts first.
        sources = {m.source for m in moves}
        empty = [
            h
            for h in view.hosts
            if h.state == "on" and h.usage.vms == 0 and h.host_id not in targets and h.host_id not in sources
        ]
        spare_left = len(empty)
        candidates = []
        for host in sorted(empty, key=lambda h: (-h.watts_per_mips, h.host_id)):
            rounds = self._empty_rounds.get(host.host_id, 0)
            if rounds < settings.idle_rounds:
                continue
            if not self._can_standby(host.host_id):
                method = self.drivers.get(host.host_id)
                how = (
                    "has no power method (add it to --bmc-config)"
                    if method is None
                    else f"cannot be both powered off and woken by {method.method}"
                )
                notes.append(f"{host.host_id} is empty but stays on: it {how}")
                continue
            held = self._held.get(host.host_id, 0.0)
            if held > now:
                notes.append(
                    f"{host.host_id} is empty but stays on for {held - now:.0f}s more: an operator powered it on"
                )
                continue
            candidates.append((host, rounds))
        margin = headroom + settings.standby_margin
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
                    f"{_pct(margin)} free (headroom {_pct(headroom)} + margin {_pct(settings.standby_margin)}) "
                    f"for {_cores(forecast, settings):.1f} cores of forecast demand and {_gib(claimed)} claimed"
                )
                break
            free_cpu = 1 - forecast / cpu_left if cpu_left else 0.0
            actions.append(
                PlannedPowerAction(
                    host_id=host.host_id,
                    action="standby",
                    reason=(
                        f"{host.host_id} standby: empty for {rounds} rounds; the {_cores(cpu_left, settings):.0f} "
                        f"cores left on keep {_pct(free_cpu)} free for the forecast demand "
                        f"(headroom {_pct(headroom)}); {spare_left - 1} other empty host(s) stay on "
                        f"(spare_hosts {settings.spare_hosts})"
                    ),
                )
            )
            cpu_on, mem_on, spare_left = cpu_left, mem_left, spare_left - 1
        return actions

    # -- recommend ----------------------------------------------------------------------------------

    def _publish(self, plan: Plan) -> None:
        """Emit the plan as events when it differs from the one published last."""
        key = (
            tuple((m.vm, m.source, m.target) for m in plan.moves),
            tuple((p.host_id, p.action) for p in plan.power),
        )
        if key == self._published:
            return
        self._published = key
        events = self.service.events
        events.emit("power.plan", f"recommendation (round {plan.round}): {plan.summary}")
        for move in plan.moves:
            events.emit("power.recommend", move.reason, host_id=move.source, vm=move.vm)
        for action in plan.power:
            events.emit("power.recommend", action.reason, host_id=action.host_id)

    # -- acting -------------------------------------------------------------------------------------

    async def apply(self) -> PlanOutcome:
        """Execute the current recommendation once (levels manual and recommend).

        In ``recommend`` the plan of the latest round is used while it is fresh (two intervals);
        otherwise a plan is computed now. Every step is checked again as it runs.

        Raises:
            ApiError: 409 at level ``auto``, where the manager applies its plan by itself.
        """
        if self.mode == "auto":
            raise ApiError(
                409,
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
            self.last_outcome = await self._execute(plan)
            return self.last_outcome

    async def _execute(self, plan: Plan) -> PlanOutcome:
        results: list[StepResult] = []
        tried: set[str] = set()
        for action in plan.power:
            if action.action == "power_on":
                await self._wake(action.host_id, action.reason, results, tried)
        ready: list[PlannedMove] = []
        for move in plan.moves:
            host = self.service.store.host(move.target)
            if host is None or not host.online or host.standby_since is not None:
                results.append(
                    StepResult(
                        kind="move",
                        subject=move.vm,
                        ok=False,
                        detail=f"deferred: {move.target} is not on yet; the move is planned again once its "
                        "agent reports in",
                    )
                )
            else:
                ready.append(move)
        await self._migrate(ready, results)
        for action in plan.power:
            if action.action == "standby":
                results.append(await self._standby(action.host_id, action.reason))
        return PlanOutcome(plan=plan, results=results, finished_at=time.time())

    async def _migrate(self, moves: list[PlannedMove], results: list[StepResult]) -> None:
        """Start ``moves`` in waves: at most ``per_host`` at once per host; wait for them all."""
        if not moves:
            return
        s = self.service
        slots: dict[str, asyncio.Semaphore] = {}
        refused: set[str] = set()  # consolidation sources whose evacuation already failed

        def slot(host_id: str) -> asyncio.Semaphore:
            return slots.setdefault(host_id, asyncio.Semaphore(self.settings.per_host))

        async def one(move: PlannedMove) -> None:
            first, second = sorted((move.source, move.target))
            async with slot(first), slot(second):
                if move.kind == "consolidate" and move.source in refused:
                    results.append(
                        StepResult(
                            kind="move",
                            subject=move.vm,
                            ok=False,
                            detail=f"skipped: another move off {move.source} failed, so it stays on",
                        )
                    )
                    return
                why_not = self._why_not_now(move)
                if why_not is None:
                    try:
                        op = s.migrations.start(move.vm, move.target, self.settings.migration_policy)
                    except ApiError as exc:
                        why_not = exc.message
                if why_not is not None:
                    if move.kind == "consolidate":
                        refused.add(move.source)
                    s.events.emit(
                        "power.move_skipped",
                        f"{move.vm}: {move.source} -> {move.target} skipped: {why_not}",
                        host_id=move.source,
                        vm=move.vm,
                    )
                    results.append(
                        StepResult(kind="move", subject=move.vm, ok=False, detail=f"skipped: {why_not}")
                    )
                    return
                s.events.emit("power.move", move.reason, host_id=move.source, vm=move.vm, op_id=op.op_id)
                done = await s.wait_operation(op.op_id, self.settings.migration_timeout_s)
                if done.state == "succeeded":
                    detail = f"moved {move.source} -> {move.target}"
                elif done.state == "running":
                    detail = f"still migrating after {self.settings.migration_timeout_s:g}s"
                else:
                    detail = f"failed, it stays on {move.source}: {done.error}"
                    if move.kind == "consolidate":
                        refused.add(move.source)
                results.append(
                    StepResult(
                        kind="move",
                        subject=move.vm,
                        ok=done.state == "succeeded",
                        detail=detail,
                        op_id=op.op_id,
                    )
                )

        await asyncio.gather(*(one(move) for move in moves))

    def _why_not_now(self, move: PlannedMove) -> str | None:
        """Why ``move`` may not start now (its VM moved within the cooldown, is busy, went away)."""
        s = self.service
        record = s.store.vm(move.vm)
        if record is None:
            return "the VM was deleted"
        if record.host_id != move.source:
            return f"the VM is on {record.host_id} now, not {move.source}"
        if record.op_id is not None:
            return f"an operation is working on it ({record.op_id})"
        last = s.store.last_operation(move.vm, "migrate")
        if last is not None and time.time() - last.created_at < self.settings.cooldown_s:
            return (
                f"it moved {time.time() - last.created_at:.0f}s ago (cooldown {self.settings.cooldown_s:g}s)"
            )
        return None

    async def _wake(self, host_id: str, reason: str, results: list[StepResult], tried: set[str]) -> None:
        """Power ``host_id`` on; if every method fails, try the next standby host (most efficient first)."""
        if host_id in tried or host_id in self._powering_on:
            return
        now = time.monotonic()
        spares = sorted(
            (
                h
                for h in self.service.store.hosts()
                if h.standby_since is not None
                and h.host_id != host_id
                and h.host_id not in self._powering_on
                and h.host_id not in tried
                and self._can_wake(h.host_id)
                and self._wake_failed.get(h.host_id, 0.0) <= now
                and not h.maintenance
            ),
            key=lambda h: (_efficiency(h), h.host_id),
        )
        for candidate in [host_id, *(h.host_id for h in spares)]:
            tried.add(candidate)
            why = reason if candidate == host_id else f"instead of {host_id}, whose power-on failed: {reason}"
            result = await self._power_on(candidate, why)
            results.append(result)
            if result.ok:
                return

    async def _power_on(self, host_id: str, reason: str) -> StepResult:
        driver = self.drivers.get(host_id)
        if driver is None or not driver.can_wake:
            return StepResult(kind="power_on", subject=host_id, ok=False, detail="no method can wake it")
        try:
            await driver.power_on()
        except PowerError as exc:
            self._wake_failed[host_id] = time.monotonic() + self.settings.wake_retry_s
            detail = self._alert(host_id, _power_on_failure(host_id, exc))
            return StepResult(kind="power_on", subject=host_id, ok=False, detail=detail)
        method = driver.last_used if isinstance(driver, FallbackPower) and driver.last_used else driver.method
        failed = driver.last_failures if isinstance(driver, FallbackPower) else []
        after = (
            " (after " + "; ".join(f"{f.method} failed: {f.reason}" for f in failed) + ")" if failed else ""
        )
        host = self.service.store.host(host_id)
        if host is not None and host.standby_since is not None:
            self._powering_on[host_id] = (time.monotonic(), method)
        detail = f"powered on via {method}{after}; waiting for its agent to report in"
        self.service.events.emit("power.on", f"{reason}: {detail}", host_id=host_id)
        return StepResult(kind="power_on", subject=host_id, ok=True, detail=detail)

    async def _standby(self, host_id: str, reason: str) -> StepResult:
        """Verify the wake path, mark the host standby, then power it off (undone if that fails)."""
        s = self.service
        driver = self.drivers.get(host_id)
        if driver is None or not (driver.can_power_off and driver.can_wake):
            return StepResult(kind="standby", subject=host_id, ok=False, detail="no method can switch it")
        check = await driver.verify_wake_path()
        if not check.ok:
            detail = (
                f"host {host_id} stays on: its wake path could not be verified, and a host nobody can wake "
                f"is never switched off ({check.detail})"
            )
            if host_id not in self._refused:
                self._refused.add(host_id)
                s.events.emit("power.standby_refused", detail, host_id=host_id)
            return StepResult(kind="standby", subject=host_id, ok=False, detail=detail)
        self._refused.discard(host_id)
        why_not = self._why_not_standby(host_id)
        if why_not is not None:
            return StepResult(kind="standby", subject=host_id, ok=False, detail=f"skipped: {why_not}")
        # No await between the check above and the mark: nothing can be placed there in between.
        self._mark_standby(host_id)
        s.events.emit(
            "power.standby",
            f"{reason}; wake path verified ({check.method}); powering it off",
            host_id=host_id,
        )
        self._powering_off.add(host_id)
        try:
            await driver.power_off()
        except PowerError as exc:
            self._unmark_standby(host_id)
            detail = self._alert(
                host_id,
                f"host {host_id} could not be powered off, so it stays on and takes VMs again: {exc}",
            )
            return StepResult(kind="standby", subject=host_id, ok=False, detail=detail)
        finally:
            self._powering_off.discard(host_id)
        return StepResult(kind="standby", subject=host_id, ok=True, detail=f"powered off via {driver.method}")

    def _why_not_standby(self, host_id: str) -> str | None:
        s = self.service
        host = s.store.host(host_id)
        if host is None:
            return "the host is gone"
        if host.standby_since is not None:
            return "it is in standby already"
        if host.maintenance:
            return "it is in maintenance"
        used = s.store.usage().get(host_id)
        if used is not None and used.vms:
            return f"it holds {used.vms} VM(s) now"
        return None

    def _mark_standby(self, host_id: str) -> None:
        s = self.service
        inventory = s.inventories.get(host_id)
        host = s.store.host(host_id)
        boot = inventory.boot_id if inventory is not None else (host.boot_id if host is not None else "")
        with s.store.transaction():
            s.store.set_host_standby(host_id, time.time())
        self._enter_standby_state(host_id, boot)

    def _enter_standby_state(self, host_id: str, boot_id: str) -> None:
        self._standby_boot[host_id] = boot_id
        self.service.ha.standby_hosts.add(host_id)
        try:
            self.service.fleet_state.set_powered_on(host_id, False)
        except FleetStateError:
            log.warning("host %s is in standby but not in the scheduler's state", host_id)

    def _unmark_standby(self, host_id: str) -> None:
        s = self.service
        with s.store.transaction():
            s.store.set_host_standby(host_id, None)
        self._standby_boot.pop(host_id, None)
        self._powering_on.pop(host_id, None)
        s.ha.standby_hosts.discard(host_id)
        self._empty_rounds[host_id] = 0
        try:
            s.fleet_state.set_powered_on(host_id, True)
        except FleetStateError:
            log.warning("host %s left standby but is not in the scheduler's state", host_id)

    def _leave_standby(self, host_id: str) -> None:
        """A standby host's agent reported in with a new boot: the host is on and takes VMs again."""
        started = self._powering_on.get(host_id)
        self._unmark_standby(host_id)
        self._wake_failed.pop(host_id, None)
        if started is not None:
            message = (
                f"host {host_id} is on: its agent reported in {time.monotonic() - started[0]:.1f}s after the "
                f"power-on via {started[1]}; it takes VMs again"
            )
        else:
            message = f"host {host_id} came back on outside the power manager; it takes VMs again"
        self.service.events.emit("power.on", message, host_id=host_id)

    def _initial_mode(self, configured: AutomationLevel | None) -> AutomationLevel:
        """The configured level, else the one last set at run time, else manual. A configured level
        that differs from the stored one replaces it, and the log says so."""
        stored = self.service.store.setting(MODE_SETTING)
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
        self.service.store.set_setting(MODE_SETTING, configured)
        return configured

    def _alert(self, host_id: str, message: str) -> str:
        self.service.events.emit("power.alert", message, host_id=host_id)
        return message

    # -- operator actions ---------------------------------------------------------------------------

    def set_mode(self, mode: AutomationLevel) -> None:
        """Switch the automation level (effective from the next round); a restarted controller keeps it
        unless its configuration names a level."""
        self.service.store.set_setting(MODE_SETTING, mode)
        if mode != self.mode:
            old, self.mode = self.mode, mode
            self._published = None
            self.service.events.emit("power.mode", f"power manager automation level: {old} -> {mode}")

    async def settle(self) -> None:
        """Wait until no plan, apply or operator power action is being carried out."""
        async with self._lock:
            pass

    def _require_driver(self, host_id: str) -> PowerDriver:
        self.service.require_host(host_id)
        driver = self.drivers.get(host_id)
        if driver is None:
            raise ApiError(
                409,
                "no_power_method",
                f"host {host_id!r} has no power method: neither a BMC (controller --bmc-config) nor "
                "Wake-on-LAN (controller --wol-config) is configured for it; add one and restart the controller",
            )
        return driver

    async def host_status(self, host_id: str) -> HostPowerReport:
        """What the host's power methods read now, and whether its wake path verifies.

        Raises:
            ApiError: 404 unknown host, 409 no power method configured for it.
        """
        driver = self._require_driver(host_id)
        try:
            status: str = await driver.status()
            detail = f"read via {driver.method}"
        except PowerError as exc:
            status, detail = "unknown", str(exc)
        check = await driver.verify_wake_path()
        return HostPowerReport(
            host_id=host_id,
            action="status",
            status=status,
            power=self.host_power(host_id),
            detail=detail,
            wake_check=WakeCheckView(ok=check.ok, method=check.method, detail=check.detail),
        )

    async def host_action(self, host_id: str, action: Literal["on", "off"]) -> HostPowerReport:
        """An operator's power action, through the same drivers and checks as the manager's own.

        ``off`` puts an empty host in standby (its wake path verified first); ``on`` powers a host on
        and keeps the manager from putting it back in standby for ``operator_hold_s``.

        Raises:
            ApiError: 404 unknown host; 409 no power method, the host is not empty, or its wake path
                does not verify; 502 the power methods failed (an alert names each one's error).
        """
        driver = self._require_driver(host_id)
        async with self._lock:
            if action == "off":
                result = await self._operator_off(host_id, driver)
            else:
                result = await self._operator_on(host_id, driver)
        try:
            status: str = await driver.status()
        except PowerError:
            status = "unknown"
        return HostPowerReport(
            host_id=host_id,
            action=action,
            status=status,
            power=self.host_power(host_id),
            detail=result.detail,
        )

    async def _operator_off(self, host_id: str, driver: PowerDriver) -> StepResult:
        host = self.service.require_host(host_id)
        if host.standby_since is not None:
            return StepResult(kind="standby", subject=host_id, ok=True, detail="already in standby")
        if not (driver.can_power_off and driver.can_wake):
            raise ApiError(
                409,
                "cannot_standby",
                f"host {host_id!r}: its power method {driver.method} cannot both power it off and wake it; "
                "configure its BMC (--bmc-config)",
            )
        used = self.service.store.usage().get(host_id)
        if used is not None and used.vms:
            names = ", ".join(vm.name for vm in self.service.store.vms(host_id)) or f"{used.vms} incoming"
            raise ApiError(
                409,
                "host_not_empty",
                f"host {host_id!r} still holds {used.vms} VM(s) ({names}); move them first with "
                f"`fleetvisor host evacuate {host_id}`, then power it off",
            )
        self._held.pop(host_id, None)
        result = await self._standby(host_id, f"{host_id} standby: requested by an operator")
        if result.ok:
            return result
        if "wake path" in result.detail:
            raise ApiError(409, "wake_path_unverified", result.detail + "; fix the wake path, then retry")
        if result.detail.startswith("skipped"):
            raise ApiError(409, "host_not_empty", f"host {host_id!r}: {result.detail}")
        raise ApiError(502, "power_failed", result.detail)

    async def _operator_on(self, host_id: str, driver: PowerDriver) -> StepResult:
        host = self.service.require_host(host_id)
        if not driver.can_wake:
            raise ApiError(
                409, "cannot_wake", f"host {host_id!r}: its power method {driver.method} cannot wake it"
            )
        self._held[host_id] = time.monotonic() + self.settings.operator_hold_s
        if host.online and host.standby_since is None:
            return StepResult(kind="power_on", subject=host_id, ok=True, detail="already on")
        result = await self._power_on(host_id, f"power on {host_id}: requested by an operator")
        if not result.ok:
            raise ApiError(502, "power_failed", result.detail)
        return result

    # -- views --------------------------------------------------------------------------------------

    def host_power(self, host_id: str, record: HostRecord | None = None) -> HostPower:
        """The host's power state, methods and energy (``record``: the host's store row, if at hand)."""
        host = record if record is not None else self.service.store.host(host_id)
        since = host.standby_since if host is not None else None
        state: Literal["on", "standby", "powering-on"] = "on"
        if since is not None:
            state = "powering-on" if host_id in self._powering_on else "standby"
        driver = self.drivers.get(host_id)
        return HostPower(
            host_id=host_id,
            state=state,
            method=driver.method if driver is not None else None,
            standby_since=since,
            energy_kwh=round(self.meter.kwh(host_id), 6),
            energy_source=self.meter.source(host_id),
            energy_since=self._energy_since.get(host_id),
        )

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
            hosts=[self.host_power(h.host_id, h) for h in self.service.store.hosts()],
            last_outcome=self.last_outcome,
        )

    # -- energy -------------------------------------------------------------------------------------

    async def _energy(self) -> None:
        while True:
            try:
                await self.sample_energy()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("power manager: energy sampling failed")
            await asyncio.sleep(min(self.settings.energy_interval_s, self.settings.interval_s))

    async def sample_energy(self) -> None:
        """One energy sample of every host: measured by its BMC where it can, else its power model."""
        s = self.service
        now = time.monotonic()
        hosts = s.store.hosts()

        async def reading(host: HostRecord) -> float | None:
            driver = self.drivers.get(host.host_id)
            if driver is None or self._dcmi_next.get(host.host_id, 0.0) > now:
                return None
            try:
                watts = await driver.power_reading_w()
            except PowerError as exc:
                log.info("host %s: no measured power: %s", host.host_id, exc)
                watts = None
            if watts is None:
                self._dcmi_next[host.host_id] = now + _DCMI_RETRY_S
            return watts

        on = [h for h in hosts if h.online and h.standby_since is None]
        readings = await asyncio.gather(*(reading(h) for h in on))
        for host, measured in zip(on, readings, strict=True):
            caps = host.capabilities
            if caps.power_max_w > 0:
                self.meter.set_model(host.host_id, LinearPowerModel(caps.power_idle_w, caps.power_max_w))
            telemetry = s.telemetry.get(host.host_id)
            cpu = telemetry.cpu_util if telemetry is not None else None
            if measured is None and (cpu is None or caps.power_max_w <= 0):
                continue  # nothing to value a sample with yet (no telemetry, or no power model)
            self.meter.record(host.host_id, now, measured_w=measured, cpu_util=cpu)
        for host in hosts:
            if host.standby_since is not None and not host.online:
                self.meter.record(host.host_id, now, powered_on=False)
        if (
            now - self._energy_saved >= self.settings.energy_save_s
            or self.meter.counted() - self._energy_since.keys()
        ):
            self._save_energy()

    def _save_energy(self) -> None:
        counted = self.meter.joules()
        self.service.store.save_energy(counted)
        self._energy_saved = time.monotonic()
        if counted.keys() - self._energy_since.keys():
            self._energy_since = {h: saved.since for h, saved in self.service.store.energy().items()}


def _efficiency(host: HostRecord) -> float:
    caps = host.capabilities
    top = caps.power_max_w if caps.power_max_w > 0 else _DEFAULT_MAX_W
    return top / max(1, caps.cores)


def _power_on_failure(host_id: str, exc: PowerError) -> str:
    """The alert for a power-on that failed by every method: each method's error and what to check."""
    failures = exc.failures if isinstance(exc, FallbackExhausted) else [exc]
    each = "; ".join(f"[{f.method} {f.target}] {f.reason} (check: {f.fix})" for f in failures)
    return f"host {host_id} could not be powered on by any of its methods: {each}"
