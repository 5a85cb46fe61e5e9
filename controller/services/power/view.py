"""The planner's model of the live fleet for one round: hosts, VMs and their load in the balancer's terms.

:func:`build_view` reads the store and the power service's tracking and returns a :class:`FleetView`:
the :class:`~controller.balancer.model.Fleet` and :class:`~controller.balancer.model.Snapshot` the
planner takes (``mips_per_core`` MIPS per core, each VM's demand from its history), the VMs that
must not move now and why, and the per-host and fleet-wide demand series the forecasts read. It
changes nothing. It may import ``controller.balancer``, ``controller.scheduler``,
``controller.state`` and its package's ``settings`` and ``tracking``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from controller.balancer.model import Fleet, Snapshot
from controller.scheduler import CapacitySettings
from controller.services.power.settings import PowerSettings
from controller.services.power.tracking import PowerTracking
from controller.state.store import HostRecord, Store, Usage, VmRecord

FloatArray = npt.NDArray[np.float64]
HostState = Literal["on", "standby", "waking"]

#: Power model assumed for a host that reports none (``power_max_w`` 0), so the planner can still
#: weigh a consolidation; energy is never counted from it.
DEFAULT_IDLE_W = 100.0
DEFAULT_MAX_W = 250.0
#: Demand assumed for a VM with no telemetry yet, as a share of its vCPUs (the planner's own default).
_INITIAL_DEMAND = 0.25
#: CPU samples are rounded to this share of a vCPU before planning.
_QUANTUM = 0.05


@dataclass(slots=True)
class ViewHost:
    """One host the planner may use: on, in standby (may be woken) or waking."""

    record: HostRecord
    state: HostState
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
class FleetView:
    """The live fleet in the balancer's terms, for one round."""

    hosts: list[ViewHost]
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


def build_view(
    *,
    store: Store,
    tracking: PowerTracking,
    health: Callable[[str], str],
    capacity: CapacitySettings,
    settings: PowerSettings,
    round_: int,
) -> FleetView:
    """The live fleet as the planner sees it in round ``round_``.

    ``health`` gives a host's failure-detector state; only ``up`` hosts that are on take part.
    """
    usage = store.usage()
    hosts = [
        _view_host(record, state, usage, capacity, settings)
        for record in store.hosts()
        if (state := _host_state(record, tracking, health)) is not None
    ]
    index = {host.host_id: i for i, host in enumerate(hosts)}
    vms = [vm for vm in store.vms() if vm.host_id in index and hosts[index[vm.host_id]].state == "on"]
    moved = store.latest_operation_times("migrate", time.time() - settings.cooldown_s)
    frozen = _frozen(vms, tracking, moved, settings)
    host_mips = np.array([h.mips for h in hosts], dtype=np.float64)
    vm_mips = np.array([vm.spec.vcpus * settings.mips_per_core for vm in vms], dtype=np.float64)
    history, length = _history(vms, tracking, settings)
    vm_host = np.array([index[vm.host_id or ""] for vm in vms], dtype=np.intp)
    host_vms: list[list[int]] = [[] for _ in hosts]
    for v, host_i in enumerate(vm_host.tolist()):
        host_vms[host_i].append(v)
    requested = history[:, 0] * vm_mips if vms else np.zeros(0)
    load = np.bincount(vm_host, weights=requested, minlength=len(hosts)).astype(np.float64)
    on = np.array([h.state == "on" for h in hosts], dtype=bool)
    # The planner takes a host with zero load for a switched-off one.
    utilization = np.where(on, np.maximum(load / np.maximum(host_mips, 1.0), 1e-6), 0.0)
    fleet = _fleet(hosts, vms, host_mips, vm_mips, settings)
    snapshot = Snapshot(
        step=round_,
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
    demand = np.array(list(tracking.demand)[: max(1, window)] or [float(load.sum())], dtype=np.float64)
    return FleetView(
        hosts=hosts,
        vms=vms,
        frozen=frozen,
        fleet=fleet,
        snapshot=snapshot,
        series=series,
        demand=demand,
        claimed_memory_mib=float(sum(h.usage.memory_mib for h in hosts if h.state == "on")),
    )


def _host_state(
    record: HostRecord, tracking: PowerTracking, health: Callable[[str], str]
) -> HostState | None:
    """How the planner may use the host, or None when it may not (maintenance, down, unwakeable)."""
    h = record.host_id
    if record.maintenance:
        return None
    if record.standby_since is not None:
        if h in tracking.powering_on:
            return "waking"
        if tracking.can_wake(h) and tracking.wake_failed.get(h, 0.0) <= time.monotonic():
            return "standby"
        return None
    if record.online and health(h) == "up":
        return "on"
    return None


def _view_host(
    record: HostRecord,
    state: HostState,
    usage: dict[str, Usage],
    capacity: CapacitySettings,
    settings: PowerSettings,
) -> ViewHost:
    caps = record.capabilities
    idle_w, max_w = caps.power_idle_w, caps.power_max_w
    if max_w <= 0:
        idle_w, max_w = DEFAULT_IDLE_W, DEFAULT_MAX_W
    return ViewHost(
        record=record,
        state=state,
        mips=max(1, caps.cores) * settings.mips_per_core,
        memory_mib=float(max(0, capacity.memory_mib(caps.memory_mib))),
        idle_w=idle_w,
        max_w=max(max_w, idle_w),
        usage=usage.get(record.host_id, Usage()),
    )


def _frozen(
    vms: Sequence[VmRecord], tracking: PowerTracking, moved: dict[str, float], settings: PowerSettings
) -> dict[str, str]:
    """The VMs that must not move now, and why."""
    frozen: dict[str, str] = {}
    for vm in vms:
        if vm.op_id is not None:
            frozen[vm.name] = f"an operation is working on it ({vm.op_id})"
        elif vm.state not in ("running", "paused"):
            frozen[vm.name] = f"it is {vm.state}"
        elif not tracking.history.get(vm.name):
            frozen[vm.name] = "no load measured yet"
        elif vm.name in moved:
            frozen[vm.name] = (
                f"it moved {time.time() - moved[vm.name]:.0f}s ago (cooldown {settings.cooldown_s:g}s)"
            )
    return frozen


def _history(
    vms: Sequence[VmRecord], tracking: PowerTracking, settings: PowerSettings
) -> tuple[FloatArray, int]:
    """Each VM's CPU samples (newest first) as one matrix, and its number of columns."""
    samples = [list(tracking.history.get(vm.name, ())) for vm in vms]
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
    return np.round(history / _QUANTUM) * _QUANTUM, length


def _fleet(
    hosts: Sequence[ViewHost],
    vms: Sequence[VmRecord],
    host_mips: FloatArray,
    vm_mips: FloatArray,
    settings: PowerSettings,
) -> Fleet:
    # Power tables: one row per distinct linear model.
    kinds: dict[tuple[float, float], int] = {}
    host_kind = np.array([kinds.setdefault((h.idle_w, h.max_w), len(kinds)) for h in hosts], dtype=np.intp)
    tables = np.array(
        [[idle + (top - idle) * i / 10 for i in range(11)] for idle, top in kinds] or [[0.0] * 11],
        dtype=np.float64,
    )
    return Fleet(
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
