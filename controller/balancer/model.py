"""The fleet as the balancer sees it: static host and VM specs, a snapshot per decision, a move.

- :class:`Fleet` holds what does not change during a run: host capacity (total MIPS and MIPS per
  core), the power table of each host kind, VM sizes (MIPS and RAM), the migration bandwidth and
  the decision interval.
- :class:`Snapshot` is what a policy is given at each decision: which host each VM runs on (in each
  host's own VM order), each VM's requested MIPS now, the last utilisation samples of each VM, and
  each host's measured utilisation.
- :data:`Migration` is what a policy answers with: a ``(vm, target host)`` pair.

The live controller (``controller.services.power``) builds these from telemetry and the offline trace
evaluation (:mod:`controller.balancer.evaluation`) from a trace. This module imports only
:mod:`controller.balancer.power_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.balancer.power_model import power_of

__all__ = ["Fleet", "Migration", "Snapshot"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

#: A migration to start: (VM index, target host index).
Migration = tuple[int, int]


@dataclass(frozen=True, eq=False)
class Fleet:
    """Static description of hosts and VMs (index = id)."""

    host_mips: FloatArray  #: total MIPS of each host (cores x MIPS per core)
    host_core_mips: FloatArray  #: MIPS of one core; one VM core cannot get more than this
    host_kind: IntArray  #: row of ``power_tables`` for each host
    power_tables: FloatArray  #: watts at 0 %, 10 %, ... 100 % for each host kind, shape (kinds, 11)
    vm_mips: FloatArray  #: MIPS of each VM (one core each)
    vm_ram_mb: FloatArray  #: RAM of each VM, MB
    host_ram_mb: float = 4096.0  #: RAM of every host, MB (checked when a VM is first created)
    host_bw_kbit_s: float = 1_000_000.0  #: network of every host (checked when a VM is first created)
    vm_bw_kbit_s: float = 100_000.0  #: network reserved by every VM
    migration_mb_s: float = 62.5  #: half of 1 Gbit/s: the share of the link migrations may use
    interval_s: float = 300.0  #: seconds between decisions
    #: Whether a running VM keeps holding its RAM and network share, so that moves must fit them (a
    #: live fleet). The literature's CloudSim setup models a running VM's RAM and bandwidth requests
    #: as zero (``UtilizationModelNull``) and checks them only at creation; ``standard_fleet`` does too.
    binding_ram: bool = True
    #: RAM of each host, MB, where hosts differ (a live fleet); None: ``host_ram_mb`` for every host.
    host_ram_each: FloatArray | None = None

    def ram_of(self, hosts: IntArray) -> FloatArray | float:
        """The RAM of ``hosts`` (one figure for all when every host has the same)."""
        return self.host_ram_mb if self.host_ram_each is None else self.host_ram_each[hosts]

    @property
    def hosts(self) -> int:
        """Number of hosts."""
        return int(self.host_mips.size)

    @property
    def vms(self) -> int:
        """Number of VMs."""
        return int(self.vm_mips.size)

    def migration_seconds(self, vm: int) -> float:
        """How long moving ``vm`` takes: its RAM over the migration bandwidth."""
        return float(self.vm_ram_mb[vm] / self.migration_mb_s)

    def power(self, hosts: IntArray, utilization: FloatArray) -> FloatArray:
        """Watts drawn by ``hosts`` at ``utilization`` if they are on."""
        return power_of(self.power_tables, self.host_kind[hosts], utilization)

    def idle_watts(self) -> FloatArray:
        """Idle power of every host."""
        return np.asarray(self.power_tables[self.host_kind, 0], dtype=np.float64)


@dataclass(eq=False)
class Snapshot:
    """The datacenter at one decision time, read-only for policies.

    ``vm_history[v, 0]`` is VM v's most recent utilisation sample (fraction of its MIPS), and only
    the first ``history_length`` columns are filled. ``host_utilization`` is each host's utilisation
    measured at this instant (allocated MIPS / host MIPS); 0 means the host is switched off.
    """

    step: int
    time_s: float
    fleet: Fleet
    vm_host: IntArray  #: host of each VM, -1 once the VM has left the datacenter
    host_vms: list[list[int]]  #: the VMs of each host in the host's own order
    vm_requested: FloatArray  #: MIPS each VM asks for now
    vm_history: FloatArray  #: shape (vms, samples), most recent first
    history_length: int
    host_utilization: FloatArray

    def host_history(self, host: int, vms: list[int] | None = None) -> FloatArray:
        """Utilisation history of ``host`` (or of ``vms`` as if they were on it), most recent first."""
        members = self.host_vms[host] if vms is None else vms
        if not members:
            return np.zeros(self.vm_history.shape[1])
        idx = np.asarray(members, dtype=np.intp)
        weights = self.fleet.vm_mips[idx] / self.fleet.host_mips[host]
        return np.asarray(weights @ self.vm_history[idx])

    def all_host_histories(self) -> FloatArray:
        """:meth:`host_history` of every host at once, shape (hosts, samples)."""
        fleet = self.fleet
        out = np.zeros((fleet.hosts, self.vm_history.shape[1]))
        present = np.flatnonzero(self.vm_host >= 0)
        hosts = self.vm_host[present]
        weights = fleet.vm_mips[present] / fleet.host_mips[hosts]
        np.add.at(out, hosts, self.vm_history[present] * weights[:, None])
        return out

    def host_requested(self) -> FloatArray:
        """Requested MIPS of each host: the sum over its VMs (not capped by anything)."""
        present = np.flatnonzero(self.vm_host >= 0)
        return np.bincount(
            self.vm_host[present], weights=self.vm_requested[present], minlength=self.fleet.hosts
        ).astype(np.float64)
