"""BalanceWeigher: prefer hosts whose CPU and memory fill up evenly, so neither strands the other.

Raw weight: minus the gap between the host's vCPU and memory shares after placing the VM.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from controller.scheduler.fleet_state import FloatArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import CapacitySettings
from controller.scheduler.weighers.base import HostWeigher, host_load_after, load_after


class BalanceWeigher(HostWeigher):
    name: ClassVar[str] = "balance"

    def __init__(self, capacity: CapacitySettings | None = None) -> None:
        self.capacity = capacity or CapacitySettings()

    def weigh_host(self, host: HostView, request: PlacementRequest) -> float:
        cpu, memory = host_load_after(host, request, self.capacity)
        return -abs(cpu - memory)

    def weigh(self, hosts: HostArrays, request: PlacementRequest) -> FloatArray:
        cpu, memory = load_after(hosts, request, self.capacity)
        weights: FloatArray = -np.abs(cpu - memory)
        return weights
