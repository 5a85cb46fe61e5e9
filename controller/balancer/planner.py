"""Fleetvisor's consolidation planner: predictive overload relief and cost-aware consolidation.

Once per interval it reads every host's load and recent history and plans a few migrations:

1. **Relieve** hosts that are overloaded now or confidently about to be: a least squares line
   through the host's recent load plus ``z`` standard errors
   (:class:`~controller.balancer.overload.PredictiveDetector`) above ``overload_utilization`` of its
   CPU. The host sheds the VMs that are cheapest to move under the migration cost model (one whose
   departure alone suffices if there is one), until its forecast is back under
   ``target_utilization``. A VM whose demand outgrows one core of its host moves to bigger cores.
2. **Consolidate** when it pays: a host below ``underload_utilization`` (the low edge of the
   hysteresis band; ``target_utilization`` is the high edge) is emptied if all its VMs fit on other
   active hosts with headroom *and* the power saved, per the SPECpower model, over ``horizon_s``
   exceeds the price of the migrations by ``min_gain``. Hosts that took part in a move this round are
   left alone, as are VMs that moved within ``cooldown_intervals``.
3. **Place** every moving VM with headroom: the target's load now, its recent peak and its forecast,
   all with the VM added, must stay under ``target_utilization``; the test runs on the summed
   history, so VMs whose peaks do not coincide pack together and correlated ones do not. Among
   fitting hosts the most power-efficient kind wins, then the fullest (best fit, fewer hosts on); a
   switched-off host is woken only to relieve an overload that no active host can take.

The migration cost model (:class:`MigrationCostModel`) prices a move by its duration (RAM over the
migration bandwidth, during which the target host counts as violating its SLA) and by the CPU the
VM loses while it moves (10 % of its demand). Every default is a round number derived from the
model (host sizes, migration times, an hour's horizon), not fitted to a trace. The design was
worked out on the PlanetLab days 20110303, 20110309 and 20110403 and checked, unchanged, on
20110306, 20110325, 20110411 and 20110412 (and on those days with their VMs reshuffled, which
changes the VM type mix); ``bench/consolidate`` reports all seven.

The live controller (``controller.services.power``) runs this planner; the trace evaluation registers
it as the ``fleetvisor`` policy. It imports only :mod:`controller.balancer.model` and
:mod:`controller.balancer.overload`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from controller.balancer.model import Fleet, Migration, Snapshot
from controller.balancer.overload import PredictiveDetector

__all__ = ["FleetvisorPolicy", "FleetvisorSettings", "MigrationCostModel"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class MigrationCostModel:
    """What a live migration costs: its duration and the CPU its VM loses meanwhile, in joules.

    ``sla_price_w`` converts a second of migration (its target host short of CPU in SLA terms) into
    watts; ``cpu_price_w_per_mips`` does the same for each MIPS the VM does not get.
    """

    bandwidth_mb_s: float = 62.5
    degradation: float = 0.1
    sla_price_w: float = 60.0
    cpu_price_w_per_mips: float = 1.0

    def seconds(self, ram_mb: FloatArray | float) -> FloatArray:
        """Duration of the move: RAM over bandwidth."""
        return np.asarray(np.asarray(ram_mb, dtype=np.float64) / self.bandwidth_mb_s)

    def lost_mips_s(self, ram_mb: FloatArray | float, demand_mips: FloatArray | float) -> FloatArray:
        """CPU the VM does not get while it moves."""
        return np.asarray(self.degradation * np.asarray(demand_mips, dtype=np.float64) * self.seconds(ram_mb))

    def price_j(self, ram_mb: FloatArray | float, demand_mips: FloatArray | float) -> FloatArray:
        """Joules-equivalent price of moving a VM of ``ram_mb`` asking ``demand_mips``."""
        seconds = self.seconds(ram_mb)
        lost = self.lost_mips_s(ram_mb, demand_mips)
        return np.asarray(self.sla_price_w * seconds + self.cpu_price_w_per_mips * lost)


@dataclass(frozen=True, slots=True)
class FleetvisorSettings:
    """Knobs of the planner; see the module docstring for what each one does."""

    #: High edge of the hysteresis band: a planned host's forecast load stays under this share.
    target_utilization: float = 0.9
    #: Relieve a host whose forecast upper bound exceeds this share (1.0: it would be short of CPU).
    overload_utilization: float = 1.0
    #: Low edge of the band: only hosts below this share are candidates for emptying.
    underload_utilization: float = 0.5
    #: Confidence margin of the forecast, in standard errors of the prediction.
    z: float = 1.0
    #: Samples (5 min each) the forecast line is fitted to.
    forecast_window: int = 6
    #: Samples whose peak (of the summed load) a placement must respect.
    peak_window: int = 6
    #: The power saved by emptying a host counts over this long.
    horizon_s: float = 3600.0
    #: Consolidate only if the saving over the horizon is at least this multiple of the move price.
    min_gain: float = 1.0
    #: A VM that moved is not moved again for this many intervals, except to relieve an overload.
    cooldown_intervals: int = 12
    #: Share of nominal MIPS a VM is assumed to use before it has reported any load (first placement).
    initial_demand: float = 0.25
    cost: MigrationCostModel = field(default_factory=MigrationCostModel)


@dataclass
class FleetvisorPolicy:
    """Fleetvisor's default consolidation policy (the simulator runs it at automation level "auto")."""

    settings: FleetvisorSettings = field(default_factory=FleetvisorSettings)
    name: str = "fleetvisor"
    #: Interval at which each VM last moved (for the cooldown).
    last_moved: dict[int, int] = field(default_factory=dict)

    def place_initial(self, fleet: Fleet) -> IntArray:
        """First-fit decreasing by assumed demand, most power-efficient hosts first.

        A VM with no history is assumed to use ``initial_demand`` of its nominal MIPS; it only goes
        where one core holds its full nominal MIPS, and the host's RAM and network must hold it.

        Raises:
            RuntimeError: some VM fits nowhere.
        """
        s = self.settings
        order = efficiency_order(fleet)
        load = np.zeros(fleet.hosts)
        count = np.zeros(fleet.hosts, dtype=np.intp)
        ram = np.zeros(fleet.hosts)
        max_vms = int(fleet.host_bw_kbit_s // fleet.vm_bw_kbit_s)
        placement = np.full(fleet.vms, -1, dtype=np.intp)
        demand = fleet.vm_mips * s.initial_demand
        for vm in np.argsort(-demand, kind="stable").tolist():
            fits = (
                (fleet.host_core_mips[order] >= fleet.vm_mips[vm])
                & (load[order] + demand[vm] <= s.target_utilization * fleet.host_mips[order])
                & (ram[order] + fleet.vm_ram_mb[vm] <= fleet.host_ram_mb)
                & (count[order] < max_vms)
            )
            hits = np.flatnonzero(fits)
            if hits.size == 0:
                raise RuntimeError(
                    f"vm {vm}: no host can take {fleet.vm_mips[vm]:.0f} MIPS and {fleet.vm_ram_mb[vm]:.0f} MB "
                    f"at creation ({fleet.hosts} hosts); add hosts"
                )
            host = int(order[hits[0]])
            placement[vm] = host
            load[host] += demand[vm]
            ram[host] += fleet.vm_ram_mb[vm]
            count[host] += 1
        return placement

    def plan(self, snapshot: Snapshot) -> list[Migration]:
        """One planning round (see the module docstring)."""
        migrations = _Round(self.settings, snapshot, self.last_moved).run()
        for vm, _ in migrations:
            self.last_moved[vm] = snapshot.step
        return migrations


def efficiency_order(fleet: Fleet) -> IntArray:
    """Hosts by watts per MIPS at full load (most efficient first), then by id."""
    per_mips = fleet.power_tables[fleet.host_kind, 10] / fleet.host_mips
    return np.lexsort((np.arange(fleet.hosts), per_mips)).astype(np.intp)


class _Round:
    """The working state of one planning round: a scratch placement and per-host load series."""

    def __init__(self, settings: FleetvisorSettings, snapshot: Snapshot, last_moved: dict[int, int]) -> None:
        s = settings
        self.s = s
        self.snap = snapshot
        self.last_moved = last_moved
        fleet = snapshot.fleet
        self.fleet = fleet
        window = max(1, min(snapshot.history_length, max(s.forecast_window, s.peak_window)))
        # Demand in MIPS, most recent first; column 0 is the demand now.
        self.vm_series = snapshot.vm_history[:, :window] * fleet.vm_mips[:, None]
        self.vm_series[:, 0] = snapshot.vm_requested
        self.vm_host = snapshot.vm_host.copy()
        present = np.flatnonzero(self.vm_host >= 0)
        self.host_series = np.zeros((fleet.hosts, window))
        np.add.at(self.host_series, self.vm_host[present], self.vm_series[present])
        self.host_vms = [list(vms) for vms in snapshot.host_vms]
        # What the scheduler must never overbook: RAM and the network's VM slots.
        self.host_ram = np.bincount(
            self.vm_host[present], weights=fleet.vm_ram_mb[present], minlength=fleet.hosts
        ).astype(np.float64)
        self.host_count = np.bincount(self.vm_host[present], minlength=fleet.hosts).astype(np.intp)
        self.max_vms = int(fleet.host_bw_kbit_s // fleet.vm_bw_kbit_s)
        self.active = snapshot.host_utilization > 0
        self.detector = PredictiveDetector(z=s.z, window=s.forecast_window)
        self.power_per_mips = fleet.power_tables[fleet.host_kind, 10] / fleet.host_mips
        self.touched = np.zeros(fleet.hosts, dtype=bool)  # gave or took a VM this round
        self.relieved = np.zeros(fleet.hosts, dtype=bool)  # overloaded this round: not a target
        self.emptied = np.zeros(fleet.hosts, dtype=bool)
        self.migrations: list[Migration] = []

    def run(self) -> list[Migration]:
        self._relieve()
        self._consolidate()
        return self.migrations

    # -- model -------------------------------------------------------------------------------

    def _cooling(self, vm: int) -> bool:
        last = self.last_moved.get(vm)
        return last is not None and self.snap.step - last < self.s.cooldown_intervals

    def _upper(self, series: FloatArray) -> FloatArray:
        """Forecast upper bound of each row's next sample (MIPS)."""
        return self.detector.upper_many(series)

    def _price(self, vms: IntArray) -> FloatArray:
        return self.s.cost.price_j(self.fleet.vm_ram_mb[vms], self.vm_series[vms, 0])

    def _fits(self, hosts: IntArray, vm: int) -> BoolArray:
        """Which ``hosts`` take ``vm`` with headroom: load, recent peak and forecast under target; on a
        fleet whose RAM binds (a live one), also room for its RAM and a network slot, which the
        scheduler would otherwise refuse.
        """
        fleet = self.fleet
        combined = self.host_series[hosts] + self.vm_series[vm]
        limit = self.s.target_utilization * fleet.host_mips[hosts]
        peak = combined[:, : self.s.peak_window].max(axis=1)
        vm_peak = float(self.vm_series[vm, : self.s.peak_window].max())
        fits = (peak <= limit) & (self._upper(combined) <= limit) & (fleet.host_core_mips[hosts] >= vm_peak)
        if fleet.binding_ram:
            fits &= (self.host_ram[hosts] + fleet.vm_ram_mb[vm] <= fleet.ram_of(hosts)) & (
                self.host_count[hosts] < self.max_vms
            )
        return np.asarray(fits)

    def _power(self, hosts: IntArray, load_mips: FloatArray) -> FloatArray:
        return self.fleet.power(hosts, load_mips / self.fleet.host_mips[hosts])

    # -- moves -------------------------------------------------------------------------------

    def _move(self, vm: int, target: int) -> None:
        source = int(self.vm_host[vm])
        self.host_vms[source].remove(vm)
        self.host_series[source] -= self.vm_series[vm]
        self.host_vms[target].append(vm)
        self.host_series[target] += self.vm_series[vm]
        self._shift(vm, source, target)
        self.vm_host[vm] = target
        self.active[target] = True
        self.touched[source] = self.touched[target] = True
        self.migrations.append((vm, target))

    def _undo_last(self, source: int) -> None:
        vm, target = self.migrations.pop()
        self.host_vms[target].remove(vm)
        self.host_series[target] -= self.vm_series[vm]
        self.host_vms[source].append(vm)
        self.host_series[source] += self.vm_series[vm]
        self._shift(vm, target, source)
        self.vm_host[vm] = source

    def _shift(self, vm: int, source: int, target: int) -> None:
        ram = self.fleet.vm_ram_mb[vm]
        self.host_ram[source] -= ram
        self.host_ram[target] += ram
        self.host_count[source] -= 1
        self.host_count[target] += 1

    def _target(self, vm: int, excluded: BoolArray, wake: bool) -> int | None:
        """The fitting active host of the most efficient kind, fullest first; else (``wake``) an idle one."""
        fleet = self.fleet
        candidates = np.flatnonzero(self.active & ~excluded)
        if candidates.size:
            fit = candidates[self._fits(candidates, vm)]
            if fit.size:
                fill = self.host_series[fit, 0] / fleet.host_mips[fit]
                return int(fit[np.lexsort((-fill, self.power_per_mips[fit]))[0]])
        if not wake:
            return None
        idle = np.flatnonzero(~self.active & ~excluded)
        fit = idle[self._fits(idle, vm)] if idle.size else idle
        if fit.size == 0:
            return None
        return int(fit[np.lexsort((fit, self.power_per_mips[fit]))[0]])

    # -- relief ------------------------------------------------------------------------------

    def _core_short(self, host: int) -> list[int]:
        """VMs of ``host`` asking more than one of its cores can give."""
        core = float(self.fleet.host_core_mips[host])
        return [vm for vm in self.host_vms[host] if float(self.vm_series[vm, 0]) > core]

    def _relieve(self) -> None:
        fleet = self.fleet
        hosts = np.flatnonzero(self.active)
        likely = self.detector.lower_many(self.host_series[hosts])
        over = likely > self.s.overload_utilization * fleet.host_mips[hosts]
        over |= np.fromiter((bool(self._core_short(h)) for h in hosts.tolist()), dtype=bool, count=hosts.size)
        self.relieved[hosts[over]] = True
        for host in hosts[over].tolist():
            self._shed(host)

    def _shed(self, host: int) -> None:
        limit = self.s.target_utilization * float(self.fleet.host_mips[host])
        excluded = self.relieved | self.emptied
        for vm in self._core_short(host):
            target = self._target(vm, excluded, wake=True)
            if target is not None:
                self._move(vm, target)
        while self.host_vms[host] and float(self._upper(self.host_series[host][None, :])[0]) > limit:
            for vm in self._relief_order(host, limit):
                target = self._target(vm, excluded, wake=True)
                if target is not None:
                    self._move(vm, target)
                    break
            else:
                return  # nothing can go anywhere

    def _relief_order(self, host: int, limit: float) -> list[int]:
        """VMs of ``host`` by preference for leaving it.

        First those whose departure alone brings the host under ``limit``, cheapest first; then
        the rest by relief per price. VMs in cooldown come last.
        """
        vms = np.asarray(self.host_vms[host], dtype=np.intp)
        price = self._price(vms)
        cooling = np.fromiter((self._cooling(int(v)) for v in vms), dtype=bool, count=vms.size)
        enough = self._upper(self.host_series[host][None, :] - self.vm_series[vms]) <= limit
        relief = self.vm_series[vms, 0] / price
        # Sort keys, last is primary: cooldown, then "enough", then price (enough) or relief (not).
        secondary = np.where(enough, price, -relief)
        order = np.lexsort((secondary, ~enough, cooling))
        return [int(v) for v in vms[order]]

    # -- consolidation -----------------------------------------------------------------------

    def _consolidate(self) -> None:
        fleet = self.fleet
        hosts = np.flatnonzero(self.active & ~self.touched)
        load = self.host_series[hosts, 0] / fleet.host_mips[hosts]
        sources = hosts[load < self.s.underload_utilization]
        if sources.size == 0 or hosts.size < 2:
            return
        price = np.array(
            [float(np.sum(self._price(np.asarray(self.host_vms[h], dtype=np.intp)))) for h in sources]
        )
        # Cheapest evacuations first; idle power is what emptying a host certainly saves.
        idle_w = fleet.power_tables[fleet.host_kind[sources], 0]
        for i in np.argsort(price - idle_w * self.s.horizon_s, kind="stable").tolist():
            source = int(sources[i])
            if self.touched[source] or any(self._cooling(vm) for vm in self.host_vms[source]):
                continue
            self._evacuate(source, float(price[i]))

    def _evacuate(self, source: int, price: float) -> bool:
        """Empty ``source`` onto other active hosts if every VM fits and the saving pays; else nothing."""
        excluded = self.relieved | self.emptied
        excluded[source] = True
        touched = self.touched.copy()
        before = self.host_series[:, 0].copy()
        moved = 0
        for vm in sorted(self.host_vms[source], key=lambda v: -float(self.vm_series[v, 0])):
            target = self._target(vm, excluded, wake=False)
            if target is None:
                break
            self._move(vm, target)
            moved += 1
        if self.host_vms[source] or not self._pays(source, before, price):
            for _ in range(moved):
                self._undo_last(source)
            self.touched = touched
            return False
        self.active[source] = False
        self.emptied[source] = True
        return True

    def _pays(self, source: int, before: FloatArray, price: float) -> bool:
        """Does the power saved (source off, targets busier) over the horizon cover the price?"""
        changed = np.flatnonzero(self.host_series[:, 0] != before)
        changed = changed[changed != source]
        src = np.array([source], dtype=np.intp)
        saved = float(self._power(src, before[src])[0])
        saved -= float(
            np.sum(self._power(changed, self.host_series[changed, 0]) - self._power(changed, before[changed]))
        )
        return saved * self.s.horizon_s >= self.s.min_gain * price
