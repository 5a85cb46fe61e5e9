"""The live scheduler inside the trace simulator: every move the planner makes must pass its filters.

The live controller executes a planned migration through the scheduler (``MigrationManager.start``):
the target must pass every hard filter (capacity with the allocation ratios, host state, affinity, ...)
and the room is claimed on it for the length of the move. :class:`SchedulerGate` does the same inside
``fleetvisor simulate``: it mirrors the simulated datacenter into a
:class:`~controller.scheduler.FleetState` and a :class:`~controller.scheduler.Scheduler` (the very code
the controller runs), claims each VM where it is placed, vets each planned migration with
``Scheduler.select`` restricted to the planned target, holds the claim on both hosts while the VM
moves, and releases the source when it lands. A move the scheduler refuses is dropped and counted,
exactly as the live controller would refuse it.

The datacenter's limits map onto the scheduler's capacity model: a host's RAM is its memory (no
reservation, no overcommit), and its network share (``host_bw / vm_bw`` VMs) becomes its vCPU
capacity, one vCPU per VM. CPU load is the planner's business (MIPS and forecasts); the scheduler
checks what must never be overbooked. In the literature's setup (``Fleet.binding_ram`` False) a running
VM requests no RAM or bandwidth, as CloudSim models it, so its claims carry none and only the
scheduler's other filters (host state, engine, pinning) can refuse a move.

Part of the trace evaluation; it imports :mod:`controller.balancer.model`, the scheduler
(:mod:`controller.scheduler`) and the store's record types.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from controller.balancer.model import Fleet, Migration
from controller.scheduler import CapacitySettings, FleetState, PlacementRequest, Scheduler
from controller.scheduler.settings import SchedulerSettings
from controller.state.store import HostRecord
from protocols.messages import Capabilities

__all__ = ["SchedulerGate"]

IntArray = npt.NDArray[np.intp]


class SchedulerGate:
    """Claims and vetoes through the live scheduler; see the module docstring."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        vms_per_host = int(fleet.host_bw_kbit_s // fleet.vm_bw_kbit_s) if fleet.binding_ram else 1_000_000
        cores = np.maximum(1, np.round(fleet.host_mips / fleet.host_core_mips)).astype(int)
        # One vCPU per VM; the allocation ratio turns a host's cores into its network's VM slots.
        capacity = CapacitySettings(
            cpu_allocation_ratio=vms_per_host / int(cores.min()),
            ram_allocation_ratio=1.0,
            reserved_host_memory_mib=0,
        )
        settings = SchedulerSettings(capacity=capacity)
        self.state = FleetState(capacity)
        for host in range(fleet.hosts):
            caps = Capabilities(
                engine="sim",
                arch="x86_64",
                accel="sim",
                cores=int(cores[host]),
                memory_mib=int(fleet.host_ram_mb),
            )
            record = HostRecord(
                host_id=self.host_id(host),
                online=True,
                boot_id="simulated",
                address="",
                agent_version="",
                capabilities=caps,
                maintenance=False,
                state_reason="",
                first_seen=0.0,
                last_seen=0.0,
            )
            self.state.upsert_host(record, {})
        self.scheduler = Scheduler(self.state, settings)
        #: Planned moves the scheduler refused, and its reason for the first few.
        self.vetoed = 0
        self.reasons: list[str] = []

    @staticmethod
    def host_id(host: int) -> str:
        """The scheduler's id of simulated host ``host``."""
        return f"h{host}"

    @staticmethod
    def vm_id(vm: int) -> str:
        """The scheduler's id of simulated VM ``vm``."""
        return f"vm{vm}"

    def _request(self, vm: int, target: int | None = None, source: int | None = None) -> PlacementRequest:
        return PlacementRequest(
            vm=self.vm_id(vm),
            vcpus=1,
            memory_mib=int(self.fleet.vm_ram_mb[vm]) if self.fleet.binding_ram else 0,
            engine="sim",
            hosts=(self.host_id(target),) if target is not None else (),
            source_host=self.host_id(source) if source is not None else None,
        )

    def place(self, placement: IntArray) -> None:
        """Claim every VM where it starts (the creates).

        Raises:
            OverbookError: the initial placement overbooks a host.
        """
        for vm, host in enumerate(placement.tolist()):
            self.state.claim(host, self._request(vm))

    def admit(self, migrations: list[Migration], vm_host: IntArray) -> list[Migration]:
        """The moves the scheduler accepts, in order; each claims its target until :meth:`landed`."""
        kept = []
        for vm, target in migrations:
            source = int(vm_host[vm])
            request = self._request(vm, target, source)
            decision = self.scheduler.select(request)
            if decision.ok and any(c.host_index == target for c in self.state.claims(request.vm)):
                kept.append((vm, target))  # already moving there
            elif decision.ok:
                self.scheduler.claim(decision, request)
                kept.append((vm, target))
            else:
                self.vetoed += 1
                if len(self.reasons) < 5 and decision.refusal is not None:
                    self.reasons.append(decision.refusal.message)
        return kept

    def landed(self, vm: int, source: int) -> None:
        """The move of ``vm`` off ``source`` completed: the source's claim goes."""
        self.state.release(self.vm_id(vm), self.host_id(source))

    def left(self, vm: int) -> None:
        """``vm`` left the datacenter: every claim it holds goes."""
        self.state.release(self.vm_id(vm))
