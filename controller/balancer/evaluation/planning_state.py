"""A scratch placement on which the CloudSim baselines try moves, with running per-host sums.

CloudSim's planner creates a VM on a host and destroys it on another while it plans, and asks the
overload detector about the result after every step; :class:`PlanningState` keeps the per-host sums
(capped and raw requested MIPS, VM counts, utilisation histories) current in O(1) per step and
vectorised over hosts, so those checks stay cheap. It never writes to the snapshot it starts from.
Only the trace evaluation uses it; it imports only :mod:`controller.balancer.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from controller.balancer.model import Fleet, Snapshot

__all__ = ["PlanningState"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


@dataclass(eq=False)
class PlanningState:
    """A scratch placement for trying moves, with per-host running sums.

    ``capped`` sums each VM's request capped at one core of the host (what the host's CPU
    scheduler reserves for it); ``requested`` sums the raw requests. A VM may be listed on two
    hosts at once while a plan moves it (CloudSim's planner does that for underloaded hosts).
    """

    snapshot: Snapshot
    track_history: bool = True  #: keep per-host utilisation histories up to date (history-based detectors)
    host_vms: list[list[int]] = field(init=False)
    capped: FloatArray = field(init=False)
    requested: FloatArray = field(init=False)
    counts: IntArray = field(init=False)  #: number of VMs listed on each host
    histories: FloatArray = field(init=False)  #: planned utilisation history of every host

    def __post_init__(self) -> None:
        snap = self.snapshot
        fleet = snap.fleet
        self.host_vms = [list(vms) for vms in snap.host_vms]
        present = np.flatnonzero(snap.vm_host >= 0)
        hosts = snap.vm_host[present]
        req = snap.vm_requested[present]
        self.capped = np.bincount(
            hosts, weights=np.minimum(req, fleet.host_core_mips[hosts]), minlength=fleet.hosts
        ).astype(np.float64)
        self.requested = np.bincount(hosts, weights=req, minlength=fleet.hosts).astype(np.float64)
        self.counts = np.array([len(vms) for vms in self.host_vms], dtype=np.intp)
        self.histories = snap.all_host_histories() if self.track_history else np.zeros((fleet.hosts, 0))

    @property
    def fleet(self) -> Fleet:
        """The static fleet."""
        return self.snapshot.fleet

    def create(self, vm: int, host: int) -> None:
        """Put ``vm`` on ``host`` (appended to the host's VM order)."""
        r = float(self.snapshot.vm_requested[vm])
        self.host_vms[host].append(vm)
        self.counts[host] += 1
        self.capped[host] += min(r, float(self.fleet.host_core_mips[host]))
        self.requested[host] += r
        self._refresh_history(host)

    def destroy(self, vm: int, host: int) -> None:
        """Take ``vm`` off ``host``."""
        r = float(self.snapshot.vm_requested[vm])
        members = self.host_vms[host]
        members.remove(vm)
        self.counts[host] -= 1
        if members:
            self.capped[host] -= min(r, float(self.fleet.host_core_mips[host]))
            self.requested[host] -= r
        else:  # no drift: an empty host sums to exactly zero
            self.capped[host] = 0.0
            self.requested[host] = 0.0
        self._refresh_history(host)

    def available(self) -> FloatArray:
        """Unreserved MIPS of every host (0 when oversubscribed)."""
        return np.maximum(self.fleet.host_mips - self.capped, 0.0)

    def _refresh_history(self, host: int) -> None:
        # Recomputed from the members rather than added and subtracted, so an all-zero history stays
        # exactly zero (detectors trim zeros).
        if self.track_history:
            self.histories[host] = self.snapshot.host_history(host, self.host_vms[host])

    def history_with(self, host: int, vm: int) -> FloatArray:
        """Planned history of ``host`` if ``vm`` joined it."""
        fleet = self.fleet
        weight = fleet.vm_mips[vm] / fleet.host_mips[host]
        return np.asarray(self.histories[host] + self.snapshot.vm_history[vm] * weight)
