"""GroupAffinityFilter: members of an ``affinity`` group run together, on the host the group is on.

The first member may go anywhere (a batch chooses that host so the whole group fits); later ones
only where members already run.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from controller.scheduler.filters.base import HostFilter, hosts_phrase
from controller.scheduler.fleet_state import BoolArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest


class GroupAffinityFilter(HostFilter):
    name: ClassVar[str] = "group_affinity"
    static: ClassVar[bool] = False

    def applies(self, request: PlacementRequest) -> bool:
        return request.group is not None and request.group_policy == "affinity"

    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        assert request.group is not None
        return host.group_sizes.get(request.group, 0) == 0 or host.group_members.get(request.group, 0) > 0

    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        assert request.group is not None
        if hosts.group_size(request.group) == 0:
            return np.ones(len(hosts.present), dtype=np.bool_)
        out = np.zeros(len(hosts.present), dtype=np.bool_)
        out[list(hosts.group_hosts(request.group))] = True
        return out

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        group = f"group {request.group!r} (affinity)"
        return hosts_phrase(count, f"does not run {group}", f"do not run {group}")

    def fix(self, reason: str, request: PlacementRequest) -> str:
        return f"free room where group {request.group!r} runs, or relax it to soft-affinity"
