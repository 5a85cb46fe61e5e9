"""HypervisorFilter: a request may need a kind of acceleration (``kvm``) or an engine (``qemu``).

Accel and engine come from the host's detected ``Capabilities``: an agent reports ``tcg`` when KVM is
present but cannot really run a guest, so ``accel=kvm`` means a host that was seen to run one.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import numpy as np

from controller.scheduler.filters.base import HostFilter, hosts_phrase
from controller.scheduler.fleet_state import BoolArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest


class HypervisorFilter(HostFilter):
    name: ClassVar[str] = "hypervisor"

    def applies(self, request: PlacementRequest) -> bool:
        return request.accel is not None or request.engine is not None

    def key(self, request: PlacementRequest) -> Hashable:
        return (request.accel, request.engine)

    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        return self.reason(host, request) == ""

    def reason(self, host: HostView, request: PlacementRequest) -> str:
        if request.engine is not None and host.engine != request.engine:
            return "engine"
        if request.accel is not None and host.accel != request.accel:
            return "accel"
        return ""

    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        out = np.ones(len(hosts.present), dtype=np.bool_)
        if request.engine is not None:
            out &= hosts.engine_code == hosts.engine_code_of(request.engine)
        if request.accel is not None:
            out &= hosts.accel_code == hosts.accel_code_of(request.accel)
        return out

    def reason_counts(
        self, hosts: HostArrays, request: PlacementRequest, rejected: BoolArray
    ) -> dict[str, int]:
        engine = np.zeros_like(rejected)
        if request.engine is not None:
            engine = rejected & (hosts.engine_code != hosts.engine_code_of(request.engine))
        counts = {
            "engine": int(np.count_nonzero(engine)),
            "accel": int(np.count_nonzero(rejected & ~engine)),
        }
        return {k: v for k, v in counts.items() if v}

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        if reason == "engine":
            return hosts_phrase(
                count, f"does not run engine {request.engine}", f"do not run engine {request.engine}"
            )
        return hosts_phrase(
            count, f"lacks {request.accel} acceleration", f"lack {request.accel} acceleration"
        )

    def fix(self, reason: str, request: PlacementRequest) -> str:
        if reason == "engine":
            return f"add a host running engine {request.engine}"
        return f"ask for another accelerator (auto or tcg), or add a host with {request.accel}"
