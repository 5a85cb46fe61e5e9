"""The weighers, one per module, and the default set a policy's multipliers pick from."""

from __future__ import annotations

from controller.scheduler.settings import SchedulerSettings
from controller.scheduler.weighers.balance import BalanceWeigher
from controller.scheduler.weighers.base import HostWeigher, normalise, normalise_values
from controller.scheduler.weighers.consolidation import ConsolidationWeigher
from controller.scheduler.weighers.free_cpu import FreeCpuWeigher
from controller.scheduler.weighers.free_memory import FreeMemoryWeigher
from controller.scheduler.weighers.migration_cost import MigrationCostWeigher, transfer_seconds
from controller.scheduler.weighers.power import PowerWeigher
from controller.scheduler.weighers.soft_affinity import SoftAffinityWeigher
from controller.scheduler.weighers.soft_anti_affinity import SoftAntiAffinityWeigher

__all__ = [
    "BalanceWeigher",
    "ConsolidationWeigher",
    "FreeCpuWeigher",
    "FreeMemoryWeigher",
    "HostWeigher",
    "MigrationCostWeigher",
    "PowerWeigher",
    "SoftAffinityWeigher",
    "SoftAntiAffinityWeigher",
    "default_weighers",
    "normalise",
    "normalise_values",
    "transfer_seconds",
]


def default_weighers(settings: SchedulerSettings) -> list[HostWeigher]:
    """Every weigher, configured from ``settings``; a policy's multipliers say which ones count."""
    return [
        FreeMemoryWeigher(settings.capacity),
        FreeCpuWeigher(settings.capacity),
        BalanceWeigher(settings.capacity),
        ConsolidationWeigher(settings.capacity),
        PowerWeigher(settings.power, settings.capacity),
        MigrationCostWeigher(settings.migration),
        SoftAffinityWeigher(),
        SoftAntiAffinityWeigher(),
    ]
