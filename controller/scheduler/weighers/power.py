"""PowerWeigher: prefer hosts that are on, and among them those nearest their most efficient load.

Servers draw a large share of their peak power at idle, so energy per unit of work is lowest on
well-loaded hosts; past a point there is no headroom left for bursts. The raw weight is minus the
distance of the host's load after placement (the larger of its vCPU and memory shares) from
``PowerSettings.target_utilisation``, less one more for a host that is powered off (which then always
loses to one that is on, since the distance is below one).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from controller.scheduler.fleet_state import FloatArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import CapacitySettings, PowerSettings
from controller.scheduler.weighers.base import HostWeigher, host_load_after, load_after

#: What waking a powered-off host costs, in units of load distance.
WAKE_PENALTY = 1.0


class PowerWeigher(HostWeigher):
    name: ClassVar[str] = "power"

    def __init__(self, power: PowerSettings | None = None, capacity: CapacitySettings | None = None) -> None:
        self.target = (power or PowerSettings()).target_utilisation
        self.capacity = capacity or CapacitySettings()

    def weigh_host(self, host: HostView, request: PlacementRequest) -> float:
        load = max(host_load_after(host, request, self.capacity))
        return -abs(load - self.target) - (0.0 if host.powered_on else WAKE_PENALTY)

    def weigh(self, hosts: HostArrays, request: PlacementRequest) -> FloatArray:
        cpu, memory = load_after(hosts, request, self.capacity)
        weights: FloatArray = -np.abs(np.maximum(cpu, memory) - self.target)
        weights -= np.where(hosts.powered_on, 0.0, WAKE_PENALTY)
        return weights
