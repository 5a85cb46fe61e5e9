"""MigrationCostWeigher: for a running VM that must move, prefer targets it reaches fastest.

A simple pre-copy model: memory crosses the link while the guest keeps dirtying pages, so the
transfer takes about ``memory / (bandwidth - dirty_rate)``; a guest that dirties as fast as the link
or faster never converges and is stopped and copied after ``max_rounds`` rounds, which caps the
estimate at ``max_rounds * memory / bandwidth``. The link is faster inside the source's rack (hosts
with the same ``MigrationSettings.rack_label`` value as ``request.source_rack``) than across racks.
The raw weight is minus the estimated seconds; only migration requests (with a source host) use it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from controller.scheduler.fleet_state import FloatArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import MigrationSettings
from controller.scheduler.weighers.base import HostWeigher


def transfer_seconds(memory_mib: float, bandwidth_mib_s: float, dirty_mib_s: float, max_rounds: int) -> float:
    """Estimated pre-copy time of ``memory_mib`` over a link while the guest dirties ``dirty_mib_s``."""
    worst = max_rounds * memory_mib / bandwidth_mib_s
    if dirty_mib_s >= bandwidth_mib_s:
        return worst
    return min(memory_mib / (bandwidth_mib_s - dirty_mib_s), worst)


class MigrationCostWeigher(HostWeigher):
    name: ClassVar[str] = "migration_cost"

    def __init__(self, migration: MigrationSettings | None = None) -> None:
        self.settings = migration or MigrationSettings()

    def applies(self, request: PlacementRequest) -> bool:
        return request.source_host is not None

    def _seconds(self, request: PlacementRequest, same_rack: bool) -> float:
        s = self.settings
        bandwidth = s.same_rack_bandwidth_mib_s if same_rack else s.cross_rack_bandwidth_mib_s
        return transfer_seconds(request.memory_mib, bandwidth, request.dirty_mib_s, s.max_rounds)

    def weigh_host(self, host: HostView, request: PlacementRequest) -> float:
        same = (
            request.source_rack is not None
            and host.labels.get(self.settings.rack_label) == request.source_rack
        )
        return -self._seconds(request, same)

    def weigh(self, hosts: HostArrays, request: PlacementRequest) -> FloatArray:
        column = hosts.label_column(self.settings.rack_label)
        if request.source_rack is None or column is None:
            same = np.zeros(len(hosts.present), dtype=np.bool_)
        else:
            same = column == hosts.label_code(self.settings.rack_label, request.source_rack)
        weights: FloatArray = np.where(same, -self._seconds(request, True), -self._seconds(request, False))
        return weights
