"""Trace-driven evaluation: a day of PlanetLab VMs on 800 hosts, any policy, CloudSim's metrics.

The datacenter is the standard one (:func:`~.trace.standard_fleet`), with one decision every 300 s
over 24 h. Its mechanics are CloudSim's, because the baselines must reproduce CloudSim's published
figures:

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

The metrics are CloudSim's (see :mod:`.metrics`). Entry points: :func:`run` (a trace file and a
policy name, optionally a plot) and :func:`simulate` (objects, a step limit for tests).

Part of the trace evaluation; it imports :mod:`controller.balancer.model`, and of the evaluation
:mod:`.gate`, :mod:`.metrics`, :mod:`.plot`, :mod:`.policy` and :mod:`.trace`.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.balancer.evaluation.gate import SchedulerGate
from controller.balancer.evaluation.metrics import Metrics, Series, SimulationResult
from controller.balancer.evaluation.plot import plot_series
from controller.balancer.evaluation.policy import Policy, make_policy
from controller.balancer.evaluation.trace import Trace, load_trace, standard_fleet
from controller.balancer.model import Fleet, Migration, Snapshot

__all__ = ["HISTORY_SAMPLES", "START_OFFSET_S", "run", "simulate"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

#: Utilisation samples each VM keeps (CloudSim's ``PowerVm.HISTORY_LENGTH``).
HISTORY_SAMPLES = 30
#: Delay between VM creation and the start of their workload (CloudSim's minimum event gap).
START_OFFSET_S = 0.1


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
    return SimulationResult(metrics=_metrics(policy.name, dc, len(series.time_s)), series=series)


def _metrics(policy: str, dc: _Datacenter, steps: int) -> Metrics:
    """CloudSim's metrics from the integrals of a finished run."""
    fleet, gate = dc.fleet, dc.gate
    slatah = dc.violation_s / dc.active_s if dc.active_s > 0 else 0.0
    pdm = dc.migration_loss_mips_s / dc.requested_mips_s if dc.requested_mips_s > 0 else 0.0
    energy_kwh = dc.energy_ws / 3.6e6
    return Metrics(
        policy=policy,
        trace=dc.trace.name,
        vms=fleet.vms,
        hosts=fleet.hosts,
        steps=steps,
        energy_kwh=energy_kwh,
        slatah=slatah,
        pdm=pdm,
        slav=slatah * pdm,
        esv=energy_kwh * slatah * pdm,
        migrations=dc.migrations,
        gated=gate is not None,
        vetoed=gate.vetoed if gate is not None else 0,
    )


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
        plot_series(result, plot_path)
    return result.metrics
