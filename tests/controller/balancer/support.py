"""Small fleets, snapshots and scripted policies for the balancer tests (no trace files needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from controller.balancer.evaluation import Trace
from controller.balancer.model import Fleet, Migration, Snapshot

#: A made-up linear power table: 100 W idle, +10 W per 10 % load.
LINEAR_W = tuple(100.0 + 10.0 * i for i in range(11))


def small_fleet(
    host_mips: list[float],
    vm_mips: list[float],
    *,
    cores: int = 1,
    vm_ram_mb: list[float] | None = None,
    tables: list[tuple[float, ...]] | None = None,
    kinds: list[int] | None = None,
) -> Fleet:
    """Hosts of ``host_mips`` total (split over ``cores``), VMs of ``vm_mips``, linear power by default."""
    hosts = np.asarray(host_mips, dtype=np.float64)
    return Fleet(
        host_mips=hosts,
        host_core_mips=hosts / cores,
        host_kind=np.asarray(kinds if kinds is not None else [0] * len(host_mips), dtype=np.intp),
        power_tables=np.asarray(tables if tables is not None else [LINEAR_W], dtype=np.float64),
        vm_mips=np.asarray(vm_mips, dtype=np.float64),
        vm_ram_mb=np.asarray(
            vm_ram_mb if vm_ram_mb is not None else [625.0] * len(vm_mips), dtype=np.float64
        ),
    )


def snapshot(
    fleet: Fleet,
    host_vms: list[list[int]],
    requested: list[float],
    *,
    history: list[list[float]] | None = None,
    step: int = 1,
) -> Snapshot:
    """A snapshot with VMs on ``host_vms`` asking ``requested`` MIPS; history (fractions) optional."""
    vm_host = np.full(fleet.vms, -1, dtype=np.intp)
    for host, vms in enumerate(host_vms):
        vm_host[vms] = host
    req = np.asarray(requested, dtype=np.float64)
    hist = (req / fleet.vm_mips)[:, None] if history is None else np.asarray(history, dtype=np.float64)
    length = hist.shape[1]
    full = np.zeros((fleet.vms, 30))
    full[:, :length] = hist
    load = np.bincount(vm_host[vm_host >= 0], weights=req[vm_host >= 0], minlength=fleet.hosts)
    return Snapshot(
        step=step,
        time_s=step * 300.0 + 0.1,
        fleet=fleet,
        vm_host=vm_host,
        host_vms=[list(v) for v in host_vms],
        vm_requested=req,
        vm_history=full,
        history_length=length,
        host_utilization=np.minimum(load / fleet.host_mips, 1.0),
    )


def trace(rows: list[list[float]], name: str = "synthetic") -> Trace:
    """A trace from utilisation fractions (the last sample is repeated, as the loader does)."""
    util = np.asarray(rows, dtype=np.float64)
    util = np.concatenate([util, util[:, -1:]], axis=1)
    return Trace(name=name, vm_names=tuple(f"vm{i}" for i in range(len(rows))), utilization=util)


@dataclass
class ScriptedPolicy:
    """Places VMs where told and starts the migrations listed for each step."""

    placement: list[int]
    moves: dict[int, list[Migration]] = field(default_factory=dict)
    name: str = "scripted"
    seen: list[Snapshot] = field(default_factory=list)

    def place_initial(self, fleet: Fleet) -> np.ndarray:
        """The scripted placement."""
        return np.asarray(self.placement, dtype=np.intp)

    def plan(self, snapshot: Snapshot) -> list[Migration]:
        """The scripted migrations of this step."""
        self.seen.append(snapshot)
        return list(self.moves.get(snapshot.step, []))
