"""LabelsFilter: ``require={"zone": "a"}`` admits only hosts whose labels say exactly that.

Labels are how hosts are grouped into zones, racks and aggregates (``pool=gpu``); an operator or the
agent sets them, and :class:`~controller.scheduler.fleet_state.FleetState` encodes each key's values
as integer codes so a requirement is one comparison per key.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import numpy as np

from controller.scheduler.filters.base import HostFilter, hosts_phrase
from controller.scheduler.fleet_state import BoolArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest


class LabelsFilter(HostFilter):
    name: ClassVar[str] = "labels"

    def applies(self, request: PlacementRequest) -> bool:
        return bool(request.require_labels)

    def key(self, request: PlacementRequest) -> Hashable:
        return frozenset(request.require_labels.items())

    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        return all(host.labels.get(k) == v for k, v in request.require_labels.items())

    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        out = np.ones(len(hosts.present), dtype=np.bool_)
        for key, value in request.require_labels.items():
            column = hosts.label_column(key)
            if column is None:
                return np.zeros(len(hosts.present), dtype=np.bool_)
            out &= column == hosts.label_code(key, value)
        return out

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(request.require_labels.items()))
        noun = "label" if len(request.require_labels) == 1 else "labels"
        return hosts_phrase(count, f"lacks {noun} {wanted}", f"lack {noun} {wanted}")

    def fix(self, reason: str, request: PlacementRequest) -> str:
        first = next(iter(sorted(request.require_labels.items())), ("KEY", "VALUE"))
        return f"label a host (`fleetvisor host label HOST {first[0]}={first[1]}`), or drop the label rule"
