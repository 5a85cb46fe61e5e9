"""SoftAntiAffinityWeigher: a ``soft-anti-affinity`` VM prefers hosts with fewer members of its group."""

from __future__ import annotations

from typing import ClassVar

from controller.scheduler.fleet_state import HostArrays, IntArray
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.weighers.base import HostWeigher


class SoftAntiAffinityWeigher(HostWeigher):
    name: ClassVar[str] = "soft_anti_affinity"

    def applies(self, request: PlacementRequest) -> bool:
        return request.group is not None and request.group_policy == "soft-anti-affinity"

    def weigh_host(self, host: HostView, request: PlacementRequest) -> float:
        assert request.group is not None
        return -float(host.group_members.get(request.group, 0))

    def weigh(self, hosts: HostArrays, request: PlacementRequest) -> IntArray:
        assert request.group is not None
        return -hosts.group_column(request.group)
