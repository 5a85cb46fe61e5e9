"""HostStateFilter: only hosts that are up take VMs (not offline, in maintenance or powered off).

A host the power manager switched off may be chosen when ``PowerSettings.wake_powered_off_hosts`` is
set; the power weigher then prefers hosts that are already on. The reasons are checked in this order,
so each host counts once: powered off, offline, in maintenance.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from controller.scheduler.filters.base import HostFilter
from controller.scheduler.fleet_state import BoolArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import PowerSettings


class HostStateFilter(HostFilter):
    name: ClassVar[str] = "host_state"

    def __init__(self, power: PowerSettings | None = None) -> None:
        self.wake = (power or PowerSettings()).wake_powered_off_hosts

    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        if not host.powered_on:
            return self.wake and not host.maintenance
        return host.online and not host.maintenance

    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        up = hosts.online & ~hosts.maintenance
        if self.wake:
            return np.where(hosts.powered_on, up, ~hosts.maintenance)
        return up & hosts.powered_on

    def reason(self, host: HostView, request: PlacementRequest) -> str:
        if not host.powered_on and not self.wake:
            return "powered_off"
        if not host.online and host.powered_on:
            return "offline"
        return "maintenance"

    def reason_counts(
        self, hosts: HostArrays, request: PlacementRequest, rejected: BoolArray
    ) -> dict[str, int]:
        off = rejected & ~hosts.powered_on if not self.wake else np.zeros_like(rejected)
        offline = rejected & ~off & hosts.powered_on & ~hosts.online
        counts = {
            "powered_off": int(np.count_nonzero(off)),
            "offline": int(np.count_nonzero(offline)),
            "maintenance": int(np.count_nonzero(rejected & ~off & ~offline)),
        }
        return {k: v for k, v in counts.items() if v}

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        return f"{count} {_WORDS.get(reason, reason)}"

    def fix(self, reason: str, request: PlacementRequest) -> str:
        return {
            "maintenance": "take a host out of maintenance (`fleetvisor host maintenance HOST off`)",
            "offline": "start the agent of an offline host",
            "powered_off": "power a host on (`fleetvisor host power HOST on`)",
        }.get(reason, "")


_WORDS = {"powered_off": "powered off", "offline": "offline", "maintenance": "in maintenance"}
