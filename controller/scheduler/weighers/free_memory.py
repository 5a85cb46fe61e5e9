"""FreeMemoryWeigher: free memory after overcommit and reserves; multiplier > 0 spreads, < 0 packs."""

from __future__ import annotations

from typing import ClassVar

from controller.scheduler.fleet_state import HostArrays, IntArray
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import CapacitySettings
from controller.scheduler.weighers.base import HostWeigher


class FreeMemoryWeigher(HostWeigher):
    name: ClassVar[str] = "free_memory"

    def __init__(self, capacity: CapacitySettings | None = None) -> None:
        self.capacity = capacity or CapacitySettings()

    def weigh_host(self, host: HostView, request: PlacementRequest) -> float:
        return float(host.free_memory_mib(self.capacity))

    def weigh(self, hosts: HostArrays, request: PlacementRequest) -> IntArray:
        return hosts.free(self.capacity)[1]
