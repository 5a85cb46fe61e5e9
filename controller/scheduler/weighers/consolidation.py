"""ConsolidationWeigher: fill hosts that already run VMs first, and open the largest free host last.

The ``pack`` policy's weigher. A host in use ranks above every empty one, the fuller it would be
after placement the better (best fit by dominant share); an empty host ranks by how little of it the
VM would take, so a new host is the largest that is free. Opening large hosts first is what keeps
the host count low on a mixed fleet (measured against the CP-SAT optimum in the tests and in
``bench/schedule``), and every host left empty can be powered off.

Raw weight: ``+load`` for a host in use, ``-load`` for an empty one, where ``load`` (0..1 on a host
the VM fits) is the larger of the host's vCPU and memory shares with the VM placed.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from controller.scheduler.fleet_state import FloatArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import CapacitySettings
from controller.scheduler.weighers.base import HostWeigher, host_load_after, load_after


class ConsolidationWeigher(HostWeigher):
    name: ClassVar[str] = "consolidation"

    def __init__(self, capacity: CapacitySettings | None = None) -> None:
        self.capacity = capacity or CapacitySettings()

    def weigh_host(self, host: HostView, request: PlacementRequest) -> float:
        load = max(host_load_after(host, request, self.capacity))
        return load if host.vms > 0 else -load

    def weigh(self, hosts: HostArrays, request: PlacementRequest) -> FloatArray:
        load, memory = load_after(hosts, request, self.capacity)
        np.maximum(load, memory, out=load)
        load *= hosts.in_use_sign
        return load
