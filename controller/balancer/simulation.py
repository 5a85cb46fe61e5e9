"""Trace-driven evaluation: a day of PlanetLab VMs on 800 hosts, any policy, CloudSim's metrics.

The datacenter is the standard one of Beloglazov & Buyya (CCPE 2012) and CloudSim 3.0.3's PlanetLab
examples (see ``shared/data/README.md``): 800 hosts alternating HP ProLiant ML110 G4 (2 x 1860 MIPS)
and G5 (2 x 2660 MIPS), 4 GB and 1 Gbit/s each; VMs of one core in four types by trace order; one
decision every 300 s over 24 h. Its mechanics are CloudSim's, because the baselines must reproduce
CloudSim's published figures:

- Time. VMs are created at 0 s at full size; their workload starts at 0.1 s; the datacenter is
  measured and the policy asked at 300.1 s, 600.1 s, ... up to 86 100.1 s (287 decisions). A VM's
  demand at time t interpolates linearly between the trace's 5-minute samples.
- CPU. A VM core gets at most one host core (a 2500-MIPS VM on a 1860-MIPS core is capped). When
  the VMs of a host ask for more than it has, all are scaled down in proportion (and floored).
- Migration. It lasts RAM / 62.5 MB/s (half of 1 Gbit/s). Meanwhile the VM gets 90 % of what it
  asks on its source, and the target reserves 10 % of it. The source counts the VM as fully busy,
  the target counts its 10 %; the target's *requested* load includes all of it, so a migration
  target counts as violating the SLA for the duration (that is CloudSim's accounting).
- Switched off. A host with no load draws nothing. A VM whose demand is exactly zero is done and
  leaves the datacenter for good (CloudSim's ``getCompletedVms``); that happens when a trace has two
  zero samples in a row.
- The datacenter is re-measured at every migration's end, so energy and SLA are integrated over
  those instants too, trapezoidally for power.

Metrics (CloudSim's ``Helper``): energy in kWh; SLATAH, the share of active host time during which a
host got less CPU than its VMs asked; PDM, the CPU lost to migrations over all CPU requested; SLAV =
SLATAH x PDM; ESV = energy x SLAV; and the number of migrations.

Entry points: :func:`run` (a trace file and a policy name, optionally a plot) and :func:`simulate`
(objects, a step limit for tests). :func:`format_summary` is a line for people and
:func:`format_metrics` the CLI's machine-readable last line.
"""

from __future__ import annotations

import gzip
import math
import pathlib
from dataclasses import dataclass, field

import msgspec
import numpy as np
import numpy.typing as npt

from controller.balancer.gate import SchedulerGate
from controller.balancer.model import Fleet, Snapshot
from controller.balancer.policy import Migration, Policy, make_policy
from controller.balancer.power_model import HP_PROLIANT_ML110_G4, HP_PROLIANT_ML110_G5

__all__ = [
    "HISTORY_SAMPLES",
    "Metrics",
    "Series",
    "SimulationResult",
    "Trace",
    "TraceError",
    "format_metrics",
    "format_summary",
    "load_trace",
    "run",
    "simulate",
    "standard_fleet",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

#: Utilisation samples each VM keeps (CloudSim's ``PowerVm.HISTORY_LENGTH``).
HISTORY_SAMPLES = 30
#: Delay between VM creation and the start of their workload (CloudSim's minimum event gap).
START_OFFSET_S = 0.1
STANDARD_HOSTS = 800
#: VM types as (MIPS, RAM MB), one core each.
VM_TYPES: tuple[tuple[float, float], ...] = ((2500, 870), (2000, 1740), (1000, 1740), (500, 613))
#: Host types as (MIPS per core, cores); host i is type i % 2.
HOST_TYPES: tuple[tuple[float, int], ...] = ((1860, 2), (2660, 2))


class TraceError(ValueError):
    """A trace file that cannot be read as one VM per line of percentages."""


@dataclass(frozen=True, eq=False)
class Trace:
    """A day of VM CPU utilisation: ``utilization[v, i]`` is VM v's load (0..1) at ``i * 300`` s.

    One column past the samples repeats the last one, as CloudSim pads its in-memory model.
    """

    name: str
    vm_names: tuple[str, ...]
    utilization: FloatArray

    @property
    def vms(self) -> int:
        """Number of VMs."""
        return len(self.vm_names)

    @property
    def samples(self) -> int:
        """Samples per VM in the file."""
        return int(self.utilization.shape[1]) - 1


def load_trace(path: str | pathlib.Path) -> Trace:
    """Read a ``.csv`` or ``.csv.gz`` trace: ``vm_name,u0,u1,...`` with u in percent, one VM a line.

    Raises:
        TraceError: the file is missing, empty, ragged or holds values outside 0..100.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError as exc:
        raise TraceError(
            f"trace {str(path)!r}: cannot read it ({exc}); pass a .csv.gz from shared/data"
        ) from exc
    if not lines:
        raise TraceError(f"trace {str(path)!r}: no VMs in it; expected lines of vm_name,u0,u1,...")
    names: list[str] = []
    rows: list[list[float]] = []
    for number, line in enumerate(lines, start=1):
        name, *values = line.split(",")
        try:
            rows.append([float(value) for value in values])
        except ValueError as exc:
            raise TraceError(f"trace {str(path)!r} line {number} (vm {name!r}): {exc}") from exc
        names.append(name)
    width = len(rows[0])
    if width < 2 or any(len(row) != width for row in rows):
        raise TraceError(f"trace {str(path)!r}: every VM needs the same number (>= 2) of samples")
    percent = np.asarray(rows)
    if percent.min() < 0 or percent.max() > 100:
        raise TraceError(f"trace {str(path)!r}: utilisation must be a percentage 0..100")
    utilization = np.concatenate([percent, percent[:, -1:]], axis=1) / 100.0
    day = path.name.split(".")[0]
    return Trace(name=day, vm_names=tuple(names), utilization=utilization)


def standard_fleet(vms: int, hosts: int = STANDARD_HOSTS) -> Fleet:
    """The literature's datacenter for ``vms`` VMs: VM i gets type ``i // ceil(vms / 4)``."""
    kinds = np.arange(hosts, dtype=np.intp) % len(HOST_TYPES)
    core = np.array([HOST_TYPES[k][0] for k in kinds], dtype=np.float64)
    cores = np.array([HOST_TYPES[k][1] for k in kinds], dtype=np.float64)
    per_type = math.ceil(vms / len(VM_TYPES))
    vm_type = np.arange(vms) // per_type
    return Fleet(
        host_mips=core * cores,
        host_core_mips=core,
        host_kind=kinds,
        power_tables=np.array([HP_PROLIANT_ML110_G4.watts, HP_PROLIANT_ML110_G5.watts]),
        vm_mips=np.array([VM_TYPES[t][0] for t in vm_type], dtype=np.float64),
        vm_ram_mb=np.array([VM_TYPES[t][1] for t in vm_type], dtype=np.float64),
        binding_ram=False,
    )


class Metrics(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one simulated day (fractions, not percent)."""

    policy: str
    trace: str
    vms: int
    hosts: int
    steps: int
    energy_kwh: float
    slatah: float
    pdm: float
    slav: float
    esv: float
    migrations: int
    #: Runs through the live scheduler (Fleetvisor's policy): planned moves its filters refused.
    gated: bool = False
    vetoed: int = 0


def format_summary(metrics: Metrics) -> str:
    """A line for people, printed before :func:`format_metrics`."""
    return (
        f"{metrics.policy} on {metrics.trace}: {metrics.vms} VMs, {metrics.hosts} hosts, {metrics.steps} intervals: "
        f"{metrics.energy_kwh:.2f} kWh, SLATAH {metrics.slatah:.3%}, PDM {metrics.pdm:.4%}, "
        f"SLAV {metrics.slav:.3g}, ESV {metrics.esv:.3g}, {metrics.migrations} migrations"
        + (f"; the live scheduler vetted every move and refused {metrics.vetoed}" if metrics.gated else "")
    )


def format_metrics(metrics: Metrics) -> str:
    """The CLI's last line: ``energy_kwh=.. slatah=.. pdm=.. slav=.. esv=.. migrations=..``."""
    return (
        f"energy_kwh={metrics.energy_kwh:.2f} slatah={metrics.slatah:.6g} pdm={metrics.pdm:.6g} "
        f"slav={metrics.slav:.6g} esv={metrics.esv:.6g} migrations={metrics.migrations}"
    )


@dataclass
class Series:
    """Per decision interval, for plots: what the datacenter did between one decision and the next."""

    time_s: list[float] = field(default_factory=list)
    active_hosts: list[int] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)  #: mean power over the interval
    sla_violation: list[float] = field(default_factory=list)  #: share of active host time violating
    migrations: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SimulationResult:
    """Metrics plus the time series behind them."""

    metrics: Metrics
    series: Series


@dataclass
class _Segment:
    """What one stretch between two measurements added up to."""

    seconds: float = 0.0
    energy_ws: float = 0.0
    active_s: float = 0.0
    violation_s: float = 0.0

    def __add__(self, other: _Segment) -> _Segment:
        return _Segment(
            self.seconds + other.seconds,
            self.energy_ws + other.energy_ws,
            self.active_s + other.active_s,
            self.violation_s + other.violation_s,
        )


@dataclass
class _State:
    """The datacenter measured at one instant (after everything that happened at it)."""

    util_mips: FloatArray  #: per host: allocated MIPS, a migrating-out VM counted in full
    requested: FloatArray  #: per host: MIPS its VMs (incl. incoming) ask for
    vm_alloc: FloatArray  #: per VM: MIPS it gets on its source host
    vm_requested: FloatArray
    vm_migrating: BoolArray
    vm_present: BoolArray


def _sum_by(index: IntArray, weights: FloatArray, length: int) -> FloatArray:
    """Sum of ``weights`` per value of ``index`` (0..length-1), in index order."""
    return np.bincount(index, weights=weights, minlength=length).astype(np.float64)


class _Datacenter:
    """Placement, in-flight migrations and the metric integrals of one run."""

    def __init__(self, fleet: Fleet, trace: Trace, gate: SchedulerGate | None = None) -> None:
        self.fleet = fleet
        self.trace = trace
        self.gate = gate
        self.vm_host = np.full(fleet.vms, -1, dtype=np.intp)
        self.host_vms: list[list[int]] = [[] for _ in range(fleet.hosts)]
        self.history = np.zeros((fleet.vms, HISTORY_SAMPLES))
        self.history_length = 0
        self.inflight: list[tuple[int, int, float]] = []  # (vm, target, end time)
        self.migrating = np.zeros(fleet.vms, dtype=bool)
        self.migrations = 0
        self.energy_ws = 0.0
        self.active_s = 0.0
        self.violation_s = 0.0
        self.requested_mips_s = 0.0
        self.migration_loss_mips_s = 0.0
        self.last_time: float | None = None
        self.last: _State | None = None
        self._hosts = np.arange(fleet.hosts)

    # -- placement -------------------------------------------------------------------------

    def place(self, placement: IntArray) -> None:
        if (
            placement.shape != (self.fleet.vms,)
            or (placement < 0).any()
            or (placement >= self.fleet.hosts).any()
        ):
            raise ValueError("initial placement must give every VM a valid host index")
        fleet = self.fleet
        ram = np.bincount(placement, weights=fleet.vm_ram_mb, minlength=fleet.hosts)
        count = np.bincount(placement, minlength=fleet.hosts)
        bad = np.flatnonzero((ram > fleet.host_ram_mb) | (count * fleet.vm_bw_kbit_s > fleet.host_bw_kbit_s))
        if bad.size:
            host = int(bad[0])
            raise ValueError(
                f"initial placement: host {host} gets {int(count[host])} VMs with {ram[host]:.0f} MB of RAM; "
                f"a host holds {fleet.host_ram_mb:.0f} MB and {int(fleet.host_bw_kbit_s // fleet.vm_bw_kbit_s)} VMs"
            )
        self.vm_host[:] = placement
        for vm, host in enumerate(placement.tolist()):
            self.host_vms[host].append(vm)
        if self.gate is not None:
            self.gate.place(placement)

    def requested_at(self, time_s: float) -> FloatArray:
        """MIPS each VM asks for at ``time_s`` (trace interpolated as CloudSim does)."""
        interval = self.fleet.interval_s
        k = math.floor(time_s / interval)
        u1 = self.trace.utilization[:, k]
        u2 = self.trace.utilization[:, min(k + 1, self.trace.utilization.shape[1] - 1)]
        utilization = u1 + (u2 - u1) / interval * (time_s - k * interval)
        return np.asarray(utilization * self.fleet.vm_mips)

    # -- measurement -----------------------------------------------------------------------

    def measure(self, requested: FloatArray) -> _State:
        """Allocate CPU as the hosts' schedulers would and read back what everyone gets."""
        fleet = self.fleet
        hosts = fleet.hosts
        present = self.vm_host >= 0
        vms = np.flatnonzero(present)
        src = self.vm_host[vms]
        r = requested[vms]
        capped = np.minimum(r, fleet.host_core_mips[src])
        out = self.migrating[vms]
        if self.inflight:
            in_vm = np.fromiter((m[0] for m in self.inflight), dtype=np.intp, count=len(self.inflight))
            in_host = np.fromiter((m[1] for m in self.inflight), dtype=np.intp, count=len(self.inflight))
        else:
            in_vm = np.zeros(0, dtype=np.intp)
            in_host = np.zeros(0, dtype=np.intp)
        in_capped = np.minimum(requested[in_vm], fleet.host_core_mips[in_host])
        reserved = _sum_by(src, capped, hosts) + _sum_by(in_host, in_capped * 0.1, hosts)
        over = reserved > fleet.host_mips
        scale = np.where(over, fleet.host_mips / np.where(reserved > 0, reserved, 1.0), 1.0)
        over_src = over[src]
        alloc = np.where(out, capped * 0.9, capped)
        alloc = np.where(
            over_src, np.floor(np.where(out, capped * scale[src] * 0.9, capped * scale[src])), alloc
        )
        counted = np.where(out, alloc / 0.9, alloc)
        in_alloc = np.where(over[in_host], np.floor(in_capped * 0.1 * scale[in_host]), in_capped * 0.1)
        util_mips = _sum_by(src, counted, hosts) + _sum_by(in_host, in_alloc, hosts)
        host_requested = _sum_by(src, r, hosts) + _sum_by(in_host, requested[in_vm], hosts)
        vm_alloc = np.zeros(fleet.vms)
        vm_alloc[vms] = alloc
        return _State(
            util_mips=util_mips,
            requested=host_requested,
            vm_alloc=vm_alloc,
            vm_requested=requested.copy(),
            vm_migrating=self.migrating.copy(),
            vm_present=present,
        )

    def utilization(self, state: _State) -> FloatArray:
        """Host utilisation 0..1 (CloudSim forgives up to 1 % over)."""
        u = state.util_mips / self.fleet.host_mips
        return np.where((u > 1.0) & (u < 1.01), 1.0, u)

    def advance(self, time_s: float, state: _State) -> _Segment:
        """Integrate energy and SLA from the last instant to ``time_s`` (``state`` measured at it)."""
        if self.last is None or self.last_time is None:
            return _Segment()
        dt = time_s - self.last_time
        if dt <= 0:
            return _Segment()
        last = self.last
        before = self.utilization(last)
        after = self.utilization(state)
        on = before != 0
        p_before = self.fleet.power(self._hosts, before)
        p_after = self.fleet.power(self._hosts, after)
        energy = float(np.sum(np.where(on, p_before + (p_after - p_before) / 2.0, 0.0))) * dt
        active = last.util_mips > 0
        violating = active & (last.util_mips < last.requested)
        active_s = float(np.count_nonzero(active)) * dt
        violation = float(np.count_nonzero(violating)) * dt
        self.energy_ws += energy
        self.active_s += active_s
        self.violation_s += violation
        vms = last.vm_present
        self.requested_mips_s += float(np.sum(last.vm_requested[vms])) * dt
        lost = vms & last.vm_migrating & (last.vm_alloc < last.vm_requested)
        self.migration_loss_mips_s += float(np.sum(last.vm_requested[lost] - last.vm_alloc[lost])) * dt
        return _Segment(seconds=dt, energy_ws=energy, active_s=active_s, violation_s=violation)

    def settle(self, time_s: float, state: _State) -> None:
        """``state`` is the final one at ``time_s``: later segments start from it."""
        self.last_time = time_s
        self.last = state

    # -- changes ---------------------------------------------------------------------------

    def remove_finished(self, requested: FloatArray) -> None:
        """VMs asking for exactly nothing (and not migrating) leave the datacenter."""
        done = np.flatnonzero((self.vm_host >= 0) & ~self.migrating & (requested == 0))
        for vm in done.tolist():
            self.host_vms[int(self.vm_host[vm])].remove(vm)
            self.vm_host[vm] = -1
            if self.gate is not None:
                self.gate.left(vm)

    def record_history(self, requested: FloatArray) -> None:
        self.history[:, 1:] = self.history[:, :-1]
        self.history[:, 0] = requested / self.fleet.vm_mips
        self.history_length = min(self.history_length + 1, HISTORY_SAMPLES)

    def start(self, migrations: list[Migration], time_s: float) -> None:
        fleet = self.fleet
        if self.gate is not None:
            migrations = self.gate.admit(migrations, self.vm_host)
        for vm, target in migrations:
            if not (0 <= vm < fleet.vms) or self.vm_host[vm] < 0:
                raise ValueError(f"migration of vm {vm}: it is not running")
            if not 0 <= target < fleet.hosts:
                raise ValueError(f"migration of vm {vm}: host {target} does not exist")
            if target == self.vm_host[vm] and not self.migrating[vm]:
                raise ValueError(f"migration of vm {vm}: it already runs on host {target}")
            if any(m[0] == vm and m[1] == target for m in self.inflight):
                continue  # CloudSim ignores a second identical request
            self.migrating[vm] = True
            self.inflight.append((vm, target, time_s + fleet.migration_seconds(vm)))
            self.migrations += 1

    def end_times(self) -> list[float]:
        return sorted({m[2] for m in self.inflight})

    def complete(self, end_time: float) -> None:
        done = [m for m in self.inflight if m[2] == end_time]
        self.inflight = [m for m in self.inflight if m[2] != end_time]
        for vm, target, _ in done:
            source = int(self.vm_host[vm])
            self.host_vms[source].remove(vm)
            self.host_vms[target].append(vm)
            self.vm_host[vm] = target
            self.migrating[vm] = False
            if self.gate is not None:
                self.gate.landed(vm, source)

    def snapshot(self, step: int, time_s: float, requested: FloatArray, state: _State) -> Snapshot:
        return Snapshot(
            step=step,
            time_s=time_s,
            fleet=self.fleet,
            vm_host=self.vm_host.copy(),
            host_vms=[list(vms) for vms in self.host_vms],
            vm_requested=requested,
            vm_history=np.where(np.arange(HISTORY_SAMPLES) < self.history_length, self.history, 0.0),
            history_length=self.history_length,
            host_utilization=self.utilization(state),
        )


def simulate(
    trace: Trace,
    policy: Policy,
    *,
    fleet: Fleet | None = None,
    max_steps: int | None = None,
    gated: bool | None = None,
) -> SimulationResult:
    """Run ``policy`` over ``trace`` (all of it, or the first ``max_steps`` decisions).

    ``gated`` runs every placement and move through the live scheduler (:class:`SchedulerGate`), as
    the controller does; by default Fleetvisor's policy is gated and the CloudSim baselines, which
    must reproduce CloudSim's published figures, are not.

    Raises:
        RuntimeError: the policy cannot place every VM at start.
        ValueError: the policy asked for an impossible migration.
    """
    fleet = fleet if fleet is not None else standard_fleet(trace.vms)
    if fleet.vms != trace.vms:
        raise ValueError(f"fleet has {fleet.vms} VMs but trace {trace.name!r} has {trace.vms}")
    if gated is None:
        gated = policy.name == "fleetvisor"
    gate = SchedulerGate(fleet) if gated else None
    dc = _Datacenter(fleet, trace, gate)
    dc.place(np.asarray(policy.place_initial(fleet), dtype=np.intp))
    interval = fleet.interval_s
    limit_s = trace.samples * interval
    steps = trace.samples - 1
    if max_steps is not None:
        steps = min(steps, max_steps)
    series = Series()
    point = _Segment()  # accumulated over the current decision interval
    for step in range(1, steps + 1):
        now = step * interval + START_OFFSET_S
        if now >= limit_s:
            break
        requested = dc.requested_at(now)
        state = dc.measure(requested)
        point += dc.advance(now, state)
        if series.time_s:
            _add_point(series, point)
            point = _Segment()
        dc.record_history(requested)
        dc.remove_finished(requested)
        migrations = policy.plan(dc.snapshot(step, now, requested, state))
        before = dc.migrations
        dc.start(migrations, now)
        state = dc.measure(requested)
        dc.settle(now, state)
        series.time_s.append(now)
        series.active_hosts.append(int(np.count_nonzero(state.util_mips > 0)))
        series.migrations.append(dc.migrations - before)
        for end in dc.end_times():
            if end > limit_s:
                break
            at_end = dc.requested_at(end)
            point += dc.advance(end, dc.measure(at_end))
            dc.remove_finished(at_end)
            dc.complete(end)
            dc.remove_finished(at_end)
            dc.settle(end, dc.measure(at_end))
    if series.time_s:
        _add_point(series, point)
    slatah = dc.violation_s / dc.active_s if dc.active_s > 0 else 0.0
    pdm = dc.migration_loss_mips_s / dc.requested_mips_s if dc.requested_mips_s > 0 else 0.0
    energy_kwh = dc.energy_ws / 3.6e6
    metrics = Metrics(
        policy=policy.name,
        trace=trace.name,
        vms=fleet.vms,
        hosts=fleet.hosts,
        steps=len(series.time_s),
        energy_kwh=energy_kwh,
        slatah=slatah,
        pdm=pdm,
        slav=slatah * pdm,
        esv=energy_kwh * slatah * pdm,
        migrations=dc.migrations,
        gated=gate is not None,
        vetoed=gate.vetoed if gate is not None else 0,
    )
    return SimulationResult(metrics=metrics, series=series)


def _add_point(series: Series, point: _Segment) -> None:
    series.power_w.append(point.energy_ws / point.seconds if point.seconds > 0 else 0.0)
    series.sla_violation.append(point.violation_s / point.active_s if point.active_s > 0 else 0.0)


def run(
    trace_path: str | pathlib.Path, policy_name: str, plot_path: str | pathlib.Path | None = None
) -> Metrics:
    """Simulate one day of ``trace_path`` under the named policy; optionally plot it to ``plot_path``.

    Raises:
        TraceError: the trace cannot be read.
        UnknownPolicyError: no policy has that name.
    """
    trace = load_trace(trace_path)
    result = simulate(trace, make_policy(policy_name))
    if plot_path is not None:
        from controller.balancer.plot import plot_series

        plot_series(result, plot_path)
    return result.metrics
