"""CapacityFilter: a host must have the VM's vCPUs, memory and disk free, after overcommit and reserves.

What a host offers comes from :class:`~controller.scheduler.settings.CapacitySettings` (Nova's
allocation ratios, plus memory, cores and disk kept back for the host). A rejected host counts once,
for the first resource it lacks in the order memory, vCPUs, disk.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from controller.scheduler.filters.base import HostFilter, hosts_phrase
from controller.scheduler.fleet_state import BoolArray, HostArrays, IntArray
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import CapacitySettings


class CapacityFilter(HostFilter):
    name: ClassVar[str] = "capacity"
    static: ClassVar[bool] = False

    def __init__(self, capacity: CapacitySettings | None = None) -> None:
        self.capacity = capacity or CapacitySettings()
        # The comparisons of the last mask(), which reason_counts() reuses when nothing changed since.
        self._last: tuple[HostArrays, PlacementRequest, int, BoolArray, BoolArray] | None = None

    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        return self.reason(host, request) == ""

    def reason(self, host: HostView, request: PlacementRequest) -> str:
        if host.free_memory_mib(self.capacity) < request.memory_mib:
            return "memory"
        if host.free_vcpus(self.capacity) < request.vcpus:
            return "vcpus"
        if host.free_disk_gib(self.capacity) < request.disk_gib:
            return "disk"
        return ""

    def free(self, hosts: HostArrays) -> tuple[IntArray, IntArray, IntArray]:
        """Free (vCPUs, MiB, GiB) per slot under this filter's settings."""
        return hosts.free(self.capacity)

    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        vcpus, memory, disk = self.free(hosts)
        has_memory = memory >= request.memory_mib
        has_vcpus = vcpus >= request.vcpus
        out = has_memory & has_vcpus
        if request.disk_gib:
            out &= disk >= request.disk_gib
        self._last = (hosts, request, hosts.usage_version, has_memory, has_vcpus)
        return out

    def reason_counts(
        self, hosts: HostArrays, request: PlacementRequest, rejected: BoolArray
    ) -> dict[str, int]:
        last = self._last
        if last is not None and last[0] is hosts and last[1] is request and last[2] == hosts.usage_version:
            has_memory, has_vcpus = last[3], last[4]
        else:
            vcpus, memory, _ = self.free(hosts)
            has_memory, has_vcpus = memory >= request.memory_mib, vcpus >= request.vcpus
        total = int(np.count_nonzero(rejected))
        with_memory = rejected & has_memory
        lacks_memory = total - int(np.count_nonzero(with_memory))
        lacks_vcpus = int(np.count_nonzero(with_memory & ~has_vcpus))
        counts = {"memory": lacks_memory, "vcpus": lacks_vcpus, "disk": total - lacks_memory - lacks_vcpus}
        return {k: v for k, v in counts.items() if v}

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        what = {"memory": "memory", "vcpus": "vCPUs", "disk": "disk"}[reason]
        return hosts_phrase(count, f"lacks {what}", f"lack {what}")

    def fix(self, reason: str, request: PlacementRequest) -> str:
        return {
            "memory": "ask for less memory, free some (stop or move VMs), or add a host",
            "vcpus": "ask for fewer vCPUs, free some (stop or move VMs), or add a host",
            "disk": "ask for a smaller disk, free some, or add a host",
        }[reason]
