"""Scheduler settings: grouped, frozen dataclasses passed explicitly (no global configuration).

``CapacitySettings`` says how much each host offers (overcommit ratios and what is kept back for the
host itself); it is shared by :class:`~controller.scheduler.fleet_state.FleetState`, which keeps free
capacity per host up to date, and by the capacity filter. ``POLICIES`` names sets of weigher
multipliers: a policy is nothing but those numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class UnknownPolicyError(ValueError):
    """A request named a policy the settings do not define."""


@dataclass(frozen=True, slots=True)
class CapacitySettings:
    """How much of a host the scheduler may promise (Nova's allocation ratios and reservations)."""

    #: vCPUs per physical core a host may promise.
    cpu_allocation_ratio: float = 4.0
    #: Memory is not overcommitted by default: a VM's RAM must really be there.
    ram_allocation_ratio: float = 1.0
    disk_allocation_ratio: float = 1.0
    #: Memory kept back for the host itself (agent, hypervisor, page cache).
    reserved_host_memory_mib: int = 512
    #: Cores kept back for the host itself, before the ratio applies.
    reserved_host_cpus: int = 0
    reserved_host_disk_gib: int = 0

    def vcpus(self, cores: int) -> int:
        """VCPUs a host with ``cores`` physical cores offers."""
        return math.trunc((cores - self.reserved_host_cpus) * self.cpu_allocation_ratio)

    def memory_mib(self, memory_mib: int) -> int:
        """MiB of guest memory a host with ``memory_mib`` offers."""
        return math.trunc((memory_mib - self.reserved_host_memory_mib) * self.ram_allocation_ratio)

    def disk_gib(self, disk_gib: int) -> int:
        """GiB of guest disk a host with ``disk_gib`` offers."""
        return math.trunc((disk_gib - self.reserved_host_disk_gib) * self.disk_allocation_ratio)


@dataclass(frozen=True, slots=True)
class PowerSettings:
    """What the power-aware weigher aims for, and whether standby hosts may be chosen."""

    #: Utilisation (dominant of CPU and memory) at which a host is most energy efficient.
    target_utilisation: float = 0.7
    #: Let the scheduler choose powered-off hosts (the power manager wakes them through the BMC).
    #: Off by default: such a host cannot take a VM until it has booted.
    wake_powered_off_hosts: bool = False


@dataclass(frozen=True, slots=True)
class MigrationSettings:
    """The transfer model behind the migration-cost weigher (pre-copy: memory over bandwidth)."""

    #: Host label naming the rack; targets in the source's rack use the faster bandwidth.
    rack_label: str = "rack"
    same_rack_bandwidth_mib_s: float = 1200.0
    cross_rack_bandwidth_mib_s: float = 400.0
    #: Pre-copy rounds before a VM that dirties memory faster than the link is stopped and copied.
    max_rounds: int = 30


#: Named policies: weigher name -> multiplier. A negative multiplier on a "free" weigher packs.
#: Group and migration weighers act only on requests that ask for them, so every policy keeps them.
_COMMON: dict[str, float] = {"soft_affinity": 4.0, "soft_anti_affinity": 4.0, "migration_cost": 2.0}
POLICIES: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        #: Few hosts: fill hosts in use, open the largest free one when needed (idle hosts power off).
        "pack": MappingProxyType({"consolidation": 1.0, **_COMMON}),
        #: Even load: the most free memory and vCPUs, with CPU and memory used in step.
        "spread": MappingProxyType({"free_memory": 1.0, "free_cpu": 1.0, "balance": 0.5, **_COMMON}),
        #: Hosts that are on, loaded near their efficient point, then consolidation.
        "power-saving": MappingProxyType({"power": 2.0, "consolidation": 1.0, **_COMMON}),
        #: The first placement's rule: the least free memory after placement, vCPUs breaking ties.
        "best-fit": MappingProxyType({"free_memory": -1.0, "free_cpu": -0.01, **_COMMON}),
    }
)


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """Everything the scheduler is configured with; the defaults keep the first placement's behaviour."""

    capacity: CapacitySettings = field(default_factory=CapacitySettings)
    power: PowerSettings = field(default_factory=PowerSettings)
    migration: MigrationSettings = field(default_factory=MigrationSettings)
    policies: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: POLICIES)
    #: Consolidation frees whole hosts to power off. ``best-fit`` is the first placement's rule.
    default_policy: str = "pack"
    #: How many of the best candidates a decision reports with their scores.
    top_candidates: int = 3

    def multipliers(self, policy: str | None) -> Mapping[str, float]:
        """The weigher multipliers of ``policy`` (the default policy when None).

        Raises:
            UnknownPolicyError: no policy has that name (the message lists the known ones).
        """
        name = policy or self.default_policy
        try:
            return self.policies[name]
        except KeyError:
            known = ", ".join(sorted(self.policies))
            raise UnknownPolicyError(f"unknown scheduling policy {name!r}; use one of: {known}") from None
