"""Consolidation policies behind one interface: the CloudSim baselines and Fleetvisor's planner.

A policy does two things:

- :meth:`Policy.place_initial` puts every VM on a host when the datacenter starts (VMs are created
  at their full nominal size, before any of them has reported load);
- :meth:`Policy.plan` looks at a :class:`~controller.balancer.model.Snapshot` once per interval and
  returns the migrations to start now, in order, as ``(vm, target host)`` pairs
  (:data:`~controller.balancer.model.Migration`).

The baselines (:class:`CloudSimPolicy`) are THR-MMT-0.8, MAD-MMT-2.5 and LR-MMT-1.2 exactly as
CloudSim 3.0.3's ``PowerVmAllocationPolicyMigrationAbstract`` runs them, quirks included, because
their published figures are the yardstick. Fleetvisor's own policy lives in
:mod:`controller.balancer.planner` and is registered here as ``fleetvisor``.

Part of the trace evaluation: it imports the live balancer's :mod:`~controller.balancer.model`,
:mod:`~controller.balancer.overload` and :mod:`~controller.balancer.planner`, and the baselines'
parts (:mod:`.detectors`, :mod:`.placement`, :mod:`.planning_state`, :mod:`.selection`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from controller.balancer.evaluation.detectors import LocalRegressionDetector, MadDetector, ThresholdDetector
from controller.balancer.evaluation.placement import find_host
from controller.balancer.evaluation.planning_state import PlanningState
from controller.balancer.evaluation.selection import minimum_migration_time
from controller.balancer.model import Fleet, Migration, Snapshot
from controller.balancer.overload import OverloadDetector
from controller.balancer.planner import FleetvisorPolicy

__all__ = [
    "BASELINES",
    "POLICIES",
    "CloudSimPolicy",
    "Policy",
    "UnknownPolicyError",
    "make_policy",
]

IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


class Policy(Protocol):
    """What the simulator needs from a consolidation policy (Fleetvisor's planner is one too)."""

    name: str

    def place_initial(self, fleet: Fleet) -> IntArray:
        """Host of every VM at start, VMs placed in index order.

        Raises:
            RuntimeError: some VM fits on no host.
        """
        ...

    def plan(self, snapshot: Snapshot) -> list[Migration]:
        """Migrations to start now, in the order they are started."""
        ...


class UnknownPolicyError(ValueError):
    """A policy name that is not registered."""


def place_initial_pabfd(fleet: Fleet, detector: OverloadDetector) -> IntArray:
    """CloudSim's first placement: PABFD with every VM at its full nominal MIPS, RAM and network.

    At creation a VM asks for all its MIPS; VMs already created ask for nothing yet (their workload
    starts later), and every host still measures 0 %, so the "power before" is idle power. The
    consequence, faithful to CloudSim, is that VMs spread over empty hosts first.

    Raises:
        RuntimeError: some VM fits on no host (CloudSim aborts the run).
    """
    hosts = np.arange(fleet.hosts)
    reserved = np.zeros(fleet.hosts)
    ram_free = np.full(fleet.hosts, fleet.host_ram_mb)
    bw_free = np.full(fleet.hosts, fleet.host_bw_kbit_s)
    idle = fleet.power(hosts, np.zeros(fleet.hosts))
    placement = np.full(fleet.vms, -1, dtype=np.intp)
    empty_history = np.zeros(1)
    for vm in range(fleet.vms):
        mips = float(fleet.vm_mips[vm])
        ram = float(fleet.vm_ram_mb[vm])
        ok = (
            (fleet.host_core_mips >= mips)
            & (fleet.host_mips - reserved >= mips)
            & (ram_free >= ram)
            & (bw_free >= fleet.vm_bw_kbit_s)
        )
        candidates = np.flatnonzero(ok)
        rise = (
            fleet.power(candidates, (reserved[candidates] + mips) / fleet.host_mips[candidates])
            - idle[candidates]
        )
        chosen = -1
        for host in candidates[np.argsort(rise, kind="stable")]:
            h = int(host)
            # Only the VM being created asks for MIPS yet, and no host has any history.
            if reserved[h] != 0 and detector.overloaded(mips / float(fleet.host_mips[h]), empty_history):
                continue
            chosen = h
            break
        if chosen < 0:
            raise RuntimeError(
                f"vm {vm}: no host can take {mips:.0f} MIPS and {ram:.0f} MB at creation "
                f"({fleet.hosts} hosts); use more hosts or fewer VMs"
            )
        placement[vm] = chosen
        reserved[chosen] += min(mips, float(fleet.host_core_mips[chosen]))
        ram_free[chosen] -= ram
        bw_free[chosen] -= fleet.vm_bw_kbit_s
    return placement


@dataclass
class CloudSimPolicy:
    """A CloudSim 3.0.3 dynamic consolidation policy: ``detector`` + MMT selection + PABFD placement.

    Each interval: hosts the detector calls overloaded shed their smallest-RAM VMs until they are
    not; those VMs go by PABFD to hosts that are neither overloaded nor made overloaded. Then the
    least utilised active host tries to move *all* its VMs onto other active hosts (all or nothing),
    then the next least utilised, and so on; hosts that received VMs from an underloaded host are no
    longer candidates to empty, hosts that were overloaded or switched off are neither sources nor
    targets. (CloudSim means to exclude the targets of the overload moves from being emptied too,
    but passes an empty list; that is reproduced, as is a VM then migrating twice in one round.)
    """

    name: str
    detector: OverloadDetector

    def place_initial(self, fleet: Fleet) -> IntArray:
        """CloudSim's PABFD at creation (see :func:`place_initial_pabfd`)."""
        return place_initial_pabfd(fleet, self.detector)

    def plan(self, snapshot: Snapshot) -> list[Migration]:
        """One round of ``optimizeAllocation``."""
        fleet = snapshot.fleet
        hosts = np.arange(fleet.hosts)
        needs_history = not isinstance(self.detector, ThresholdDetector)
        plan = PlanningState(snapshot, track_history=needs_history)
        utilization = snapshot.host_utilization
        power_now = fleet.power(hosts, utilization)

        requested = plan.requested / fleet.host_mips
        overloaded = self.detector.overloaded_many(requested, plan.histories)
        overloaded_hosts = np.flatnonzero(overloaded)

        # Overloaded hosts shed VMs (MMT) until the detector is satisfied.
        leaving: list[int] = []
        for host in overloaded_hosts.tolist():
            while True:
                vm = minimum_migration_time(plan.host_vms[host], fleet.vm_ram_mb)
                if vm is None:
                    break
                leaving.append(vm)
                plan.destroy(vm, host)
                if not self._overloaded(plan, host):
                    break
        migrations: list[Migration] = []
        excluded = overloaded.copy()
        for vm in self._by_decreasing_request(snapshot, leaving):
            target = find_host(plan, vm, excluded, self.detector, power_now)
            if target is not None:
                plan.create(vm, target)
                migrations.append((vm, target))

        # Underloaded hosts, least utilised first, try to empty themselves.
        switched_off = utilization == 0
        not_source = overloaded | switched_off
        not_target = overloaded | switched_off
        while not not_source.all():
            candidates = ~not_source & (utilization > 0) & (utilization < 1) & (plan.counts > 0)
            if not candidates.any():
                break
            masked = np.where(candidates, utilization, np.inf)
            source = int(np.argmin(masked))
            not_source[source] = True
            not_target[source] = True
            placed = self._move_all(plan, source, not_target, power_now)
            for _, target in placed:
                not_source[target] = True
            migrations.extend(placed)
        return migrations

    def _move_all(
        self, plan: PlanningState, source: int, not_target: BoolArray, power_now: FloatArray
    ) -> list[Migration]:
        """Every VM of ``source`` placed off it by PABFD, or none (the plan undone) if one fits nowhere."""
        moving = self._by_decreasing_request(plan.snapshot, list(plan.host_vms[source]))
        placed: list[Migration] = []
        for vm in moving:
            target = find_host(plan, vm, not_target, self.detector, power_now)
            if target is None:
                for undo_vm, undo_host in placed:
                    plan.destroy(undo_vm, undo_host)
                return []
            plan.create(vm, target)
            placed.append((vm, target))
        return placed

    def _overloaded(self, plan: PlanningState, host: int) -> bool:
        requested = plan.requested[host] / plan.fleet.host_mips[host]
        return self.detector.overloaded(float(requested), plan.histories[host])

    @staticmethod
    def _by_decreasing_request(snapshot: Snapshot, vms: list[int]) -> list[int]:
        # Stable, like Java's Collections.sort.
        return sorted(vms, key=lambda vm: -float(snapshot.vm_requested[vm]))


def _thr() -> Policy:
    return CloudSimPolicy("THR-MMT-0.8", ThresholdDetector(0.8))


def _mad() -> Policy:
    return CloudSimPolicy("MAD-MMT-2.5", MadDetector(2.5))


def _lr() -> Policy:
    return CloudSimPolicy("LR-MMT-1.2", LocalRegressionDetector(1.2))


def _fleetvisor() -> Policy:
    return FleetvisorPolicy()


#: The three CloudSim baselines, in the order the benchmark reports them.
BASELINES: tuple[str, ...] = ("THR-MMT-0.8", "MAD-MMT-2.5", "LR-MMT-1.2")

#: Every policy by name.
POLICIES: dict[str, Callable[[], Policy]] = {
    "THR-MMT-0.8": _thr,
    "MAD-MMT-2.5": _mad,
    "LR-MMT-1.2": _lr,
    "fleetvisor": _fleetvisor,
}


#: The short names of the CLI (``--policy thr-mmt``).
ALIASES: dict[str, str] = {"thr-mmt": "THR-MMT-0.8", "mad-mmt": "MAD-MMT-2.5", "lr-mmt": "LR-MMT-1.2"}


def make_policy(name: str) -> Policy:
    """A fresh policy by name (case-insensitive; ``thr-mmt``, ``mad-mmt`` and ``lr-mmt`` are short names).

    Raises:
        UnknownPolicyError: the name is not registered; the message lists the known names.
    """
    name = ALIASES.get(name.lower(), name)
    for known, factory in POLICIES.items():
        if known.lower() == name.lower():
            return factory()
    raise UnknownPolicyError(
        f"policy {name!r}: unknown; choose one of {', '.join([*ALIASES, *POLICIES])} (e.g. --policy fleetvisor)"
    )
