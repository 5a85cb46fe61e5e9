"""GroupAntiAffinityFilter: members of an ``anti-affinity`` group never share a host."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from controller.scheduler.filters.base import HostFilter, hosts_phrase
from controller.scheduler.fleet_state import BoolArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest


class GroupAntiAffinityFilter(HostFilter):
    name: ClassVar[str] = "group_anti_affinity"
    static: ClassVar[bool] = False

    def applies(self, request: PlacementRequest) -> bool:
        return request.group is not None and request.group_policy == "anti-affinity"

    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        assert request.group is not None
        return host.group_members.get(request.group, 0) == 0

    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        assert request.group is not None
        out = np.ones(len(hosts.present), dtype=np.bool_)
        out[list(hosts.group_hosts(request.group))] = False
        return out

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        group = f"group {request.group!r} (anti-affinity)"
        return hosts_phrase(count, f"already runs a member of {group}", f"already run a member of {group}")

    def fix(self, reason: str, request: PlacementRequest) -> str:
        return f"add a host, or relax group {request.group!r} to soft-anti-affinity"
