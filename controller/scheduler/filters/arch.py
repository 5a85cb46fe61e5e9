"""ArchFilter: a guest goes only to a host that can run its architecture.

A host runs its own architecture and every one it lists in ``Capabilities.guest_arches`` (a 64-bit
x86 host running i386 guests, or a QEMU host emulating others under TCG).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import numpy as np

from controller.scheduler.filters.base import HostFilter, hosts_phrase
from controller.scheduler.fleet_state import BoolArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest


class ArchFilter(HostFilter):
    name: ClassVar[str] = "arch"

    def key(self, request: PlacementRequest) -> Hashable:
        return request.arch

    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        return host.can_run(request.arch)

    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        out: BoolArray = (hosts.arch_bits & np.uint64(hosts.arch_bit(request.arch))) != 0
        return out

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        return hosts_phrase(count, f"cannot run {request.arch} guests", f"cannot run {request.arch} guests")

    def fix(self, reason: str, request: PlacementRequest) -> str:
        return f"ask for an arch the fleet runs, or add a {request.arch} host"
