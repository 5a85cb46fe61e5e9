"""One host as a filter's ``host_passes`` or a weigher's ``weigh_host`` sees it.

A small frozen value: the host's capabilities, state flags, labels, what its VMs claim, and how many
members of each VM group it runs. The per-host predicates read only this, which keeps them pure and
easy to test; the hot path reads the same facts from :class:`~controller.scheduler.fleet_state.HostArrays`.
:func:`free_capacity` reads a host's free room from its store record (admission and the API's host
views use it). It imports the settings and the store's record types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controller.scheduler.settings import CapacitySettings, SchedulerSettings
from controller.state.store import HostRecord, Usage

_EMPTY: Mapping[str, int] = MappingProxyType({})
_NO_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class HostView:
    """What the scheduler knows about one host at one moment."""

    host_id: str
    arch: str
    accel: str
    engine: str
    cores: int
    memory_mib: int
    disk_gib: int = 0
    guest_arches: frozenset[str] = frozenset()
    cpu_features: frozenset[str] = frozenset()
    online: bool = True
    maintenance: bool = False
    powered_on: bool = True
    labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS)
    used_vcpus: int = 0
    used_memory_mib: int = 0
    used_disk_gib: int = 0
    vms: int = 0
    power_idle_w: float = 0.0
    power_max_w: float = 0.0
    #: Members of each VM group on this host, and in the whole fleet.
    group_members: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    group_sizes: Mapping[str, int] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def from_record(
        cls,
        record: HostRecord,
        usage: Usage | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        powered_on: bool = True,
        group_members: Mapping[str, int] | None = None,
        group_sizes: Mapping[str, int] | None = None,
    ) -> HostView:
        """The view of a stored host with its claimed ``usage``."""
        caps = record.capabilities
        used = usage or Usage()
        return cls(
            host_id=record.host_id,
            arch=caps.arch,
            accel=caps.accel,
            engine=caps.engine,
            cores=caps.cores,
            memory_mib=caps.memory_mib,
            disk_gib=caps.disk_gib,
            guest_arches=frozenset(caps.guest_arches),
            cpu_features=frozenset(caps.cpu_features),
            online=record.online,
            maintenance=record.maintenance,
            powered_on=powered_on,
            labels=MappingProxyType(dict(labels or {})),
            used_vcpus=used.vcpus,
            used_memory_mib=used.memory_mib,
            used_disk_gib=used.disk_gib,
            vms=used.vms,
            power_idle_w=caps.power_idle_w,
            power_max_w=caps.power_max_w,
            group_members=MappingProxyType(dict(group_members or {})),
            group_sizes=MappingProxyType(dict(group_sizes or {})),
        )

    def can_run(self, arch: str) -> bool:
        """Whether guests of ``arch`` run here (natively or as a listed guest architecture)."""
        return arch == self.arch or arch in self.guest_arches

    def free_vcpus(self, capacity: CapacitySettings) -> int:
        """VCPUs left after the claims, under ``capacity``'s allocation ratio."""
        return capacity.vcpus(self.cores) - self.used_vcpus

    def free_memory_mib(self, capacity: CapacitySettings) -> int:
        """MiB of memory left after the claims and ``capacity``'s reservation."""
        return capacity.memory_mib(self.memory_mib) - self.used_memory_mib

    def free_disk_gib(self, capacity: CapacitySettings) -> int:
        """GiB of disk left after the claims, under ``capacity``'s allocation ratio."""
        return capacity.disk_gib(self.disk_gib) - self.used_disk_gib


def free_capacity(
    host: HostRecord, used: Usage, settings: CapacitySettings | SchedulerSettings
) -> tuple[int, int, int]:
    """(free vCPUs, free MiB, free GiB of disk) on ``host`` after its claims."""
    capacity = settings.capacity if isinstance(settings, SchedulerSettings) else settings
    view = HostView.from_record(host, used)
    return view.free_vcpus(capacity), view.free_memory_mib(capacity), view.free_disk_gib(capacity)
