"""The filters, one per module, and the default chain in the order the scheduler applies them.

Static filters come first (their combined mask is cached per request signature), then the ones that
read claims. The order also decides which reason a host that fails several is counted under; it
keeps the first placement's: offline, maintenance, architecture, then memory, vCPUs, disk.
"""

from __future__ import annotations

from controller.scheduler.filters.arch import ArchFilter
from controller.scheduler.filters.base import HostFilter, hosts_phrase
from controller.scheduler.filters.capacity import CapacityFilter
from controller.scheduler.filters.cpu_features import CpuFeaturesFilter
from controller.scheduler.filters.group_affinity import GroupAffinityFilter
from controller.scheduler.filters.group_anti_affinity import GroupAntiAffinityFilter
from controller.scheduler.filters.host_affinity import HostAffinityFilter
from controller.scheduler.filters.host_state import HostStateFilter
from controller.scheduler.filters.hypervisor import HypervisorFilter
from controller.scheduler.filters.labels import LabelsFilter
from controller.scheduler.settings import SchedulerSettings

__all__ = [
    "ArchFilter",
    "CapacityFilter",
    "CpuFeaturesFilter",
    "GroupAffinityFilter",
    "GroupAntiAffinityFilter",
    "HostAffinityFilter",
    "HostFilter",
    "HostStateFilter",
    "HypervisorFilter",
    "LabelsFilter",
    "default_filters",
    "hosts_phrase",
]


def default_filters(settings: SchedulerSettings) -> list[HostFilter]:
    """Every filter, configured from ``settings``, static ones first."""
    return [
        HostStateFilter(settings.power),
        HostAffinityFilter(),
        ArchFilter(),
        HypervisorFilter(),
        CpuFeaturesFilter(),
        LabelsFilter(),
        GroupAffinityFilter(),
        GroupAntiAffinityFilter(),
        CapacityFilter(settings.capacity),
    ]
