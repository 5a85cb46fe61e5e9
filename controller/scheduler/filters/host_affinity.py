"""HostAffinityFilter: a VM pinned to some hosts goes only there, and never to hosts it avoids.

A migration's source host is never a target either: the VM is already there.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import numpy as np

from controller.scheduler.filters.base import HostFilter, hosts_phrase
from controller.scheduler.fleet_state import BoolArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest


class HostAffinityFilter(HostFilter):
    name: ClassVar[str] = "host_affinity"

    def applies(self, request: PlacementRequest) -> bool:
        return bool(request.hosts or request.avoid_hosts or request.source_host)

    def key(self, request: PlacementRequest) -> Hashable:
        return (request.hosts, request.avoid_hosts, request.source_host)

    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        return self.reason(host, request) == ""

    def reason(self, host: HostView, request: PlacementRequest) -> str:
        if host.host_id == request.source_host:
            return "source_host"
        if request.hosts and host.host_id not in request.hosts:
            return "not_requested"
        if host.host_id in request.avoid_hosts:
            return "avoided"
        return ""

    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        if request.hosts:
            out = np.zeros(len(hosts.present), dtype=np.bool_)
            out[self._slots(hosts, request.hosts)] = True
        else:
            out = np.ones(len(hosts.present), dtype=np.bool_)
        out[self._slots(hosts, request.avoid_hosts)] = False
        if request.source_host:
            out[self._slots(hosts, (request.source_host,))] = False
        return out

    def reason_counts(
        self, hosts: HostArrays, request: PlacementRequest, rejected: BoolArray
    ) -> dict[str, int]:
        source = np.zeros_like(rejected)
        if request.source_host:
            source[self._slots(hosts, (request.source_host,))] = True
        listed = np.ones_like(rejected)
        if request.hosts:
            listed[:] = False
            listed[self._slots(hosts, request.hosts)] = True
        counts = {
            "source_host": int(np.count_nonzero(rejected & source)),
            "not_requested": int(np.count_nonzero(rejected & ~source & ~listed)),
            "avoided": int(np.count_nonzero(rejected & ~source & listed)),
        }
        return {k: v for k, v in counts.items() if v}

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        if reason == "source_host":
            return hosts_phrase(count, "is where it runs now", "are where it runs now")
        if reason == "not_requested":
            return hosts_phrase(count, "is not in its host list", "are not in its host list")
        return hosts_phrase(count, "is on its avoid list", "are on its avoid list")

    def fix(self, reason: str, request: PlacementRequest) -> str:
        if reason == "not_requested":
            return f"name hosts that can take it in --host (now {', '.join(request.hosts)}), or drop --host"
        if reason == "source_host":
            return "it already runs on the only host left; choose another host"
        return f"shorten its avoid list (now {', '.join(request.avoid_hosts)})"

    @staticmethod
    def _slots(hosts: HostArrays, host_ids: tuple[str, ...]) -> list[int]:
        return [i for i in (hosts.index.get(h) for h in host_ids) if i is not None]
