"""The fleet as the scheduler holds it, and its writes: hosts joining, changing and leaving, VM claims.

:class:`FleetState` extends the per-host columns of :class:`~controller.scheduler.host_arrays.HostArrays`
(the read side filters and weighers work on, updated in O(1) per claim) with the writes: hosts that
join, change and leave, and VM claims and releases with their group bookkeeping.

Nothing here touches SQLite or the bus. The controller builds a state with
:meth:`FleetState.from_records` from its store's records and keeps it in step; a trace-driven
simulator builds one from synthetic records and never needs a store at all.

Imports: :mod:`~controller.scheduler.host_arrays` (whose column types, codes, :class:`HostArrays` and
:class:`FleetStateError` it re-exports, so both modules' names import from here), the scheduler's
leaf modules (request, settings) and the store's record types; nothing imports this module back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from controller.scheduler.host_arrays import (
    ABSENT,
    NO_MATCH,
    BitArray,
    BoolArray,
    CodeArray,
    FleetStateError,
    FloatArray,
    HostArrays,
    IntArray,
)
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import CapacitySettings
from controller.state.store import HostRecord, Usage, VmRecord

__all__ = [
    "ABSENT",
    "GROUP_LABEL",
    "NO_MATCH",
    "BitArray",
    "BoolArray",
    "Claim",
    "CodeArray",
    "FleetState",
    "FleetStateError",
    "FloatArray",
    "HostArrays",
    "IntArray",
    "OverbookError",
]

#: VM label the controller may use to persist a VM's group (``from_records`` reads it).
GROUP_LABEL = "fleetvisor.io/group"


class OverbookError(FleetStateError):
    """A claim would promise more than a host offers."""


@dataclass(frozen=True, slots=True)
class Claim:
    """Resources one VM holds on one host (a migrating VM holds one on each end)."""

    vm: str
    host_index: int
    host_id: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    group: str | None = None


class FleetState(HostArrays):
    """:class:`HostArrays` plus the writes: hosts that join, change and leave, and VM claims.

    Every write is O(1) in the number of hosts (a label or feature never seen before may widen a
    column once). ``claim`` refuses to overbook; the controller claims and persists with no await in
    between, so the state and the store move together.
    """

    def __init__(self, capacity: CapacitySettings | None = None) -> None:
        super().__init__(capacity)
        self._claims: dict[str, list[Claim]] = {}

    @classmethod
    def from_records(
        cls,
        hosts: Iterable[HostRecord],
        usage: Mapping[str, Usage],
        labels: Mapping[str, Mapping[str, str]] | None = None,
        *,
        vms: Iterable[VmRecord] = (),
        groups: Mapping[str, str] | None = None,
        capacity: CapacitySettings | None = None,
    ) -> FleetState:
        """A state built from the store: its hosts, its per-host ``usage`` and host ``labels``.

        ``vms`` (optional) names the VMs behind the usage, so ``release(vm)`` works for them and
        group members are counted; a VM's group comes from ``groups`` (vm name -> group) or else
        from its spec label :data:`GROUP_LABEL`. ``usage`` stays the authority for the totals.
        """
        host_list = list(hosts)
        state = cls(capacity)
        state._reserve(len(host_list))
        for record in host_list:
            state.upsert_host(record, (labels or {}).get(record.host_id, {}))
        for vm in vms:
            if vm.host_id is None or vm.host_id not in state.index:
                continue
            group = groups.get(vm.name) if groups is not None else vm.spec.labels.get(GROUP_LABEL)
            state.adopt(vm.name, vm.host_id, vm.spec.vcpus, vm.spec.memory_mib, vm.spec.disk_gib, group)
            if vm.migrating_to is not None and vm.migrating_to in state.index:
                spec = vm.spec
                state.adopt(vm.name, vm.migrating_to, spec.vcpus, spec.memory_mib, spec.disk_gib, group)
        for host_id, used in usage.items():
            if host_id in state.index:
                state.set_usage(host_id, used)
        return state

    # -- hosts -----------------------------------------------------------------------------------

    def upsert_host(
        self, record: HostRecord, labels: Mapping[str, str] | None = None, *, powered_on: bool | None = None
    ) -> int:
        """Add a host that joined, or update one whose inventory changed; returns its slot.

        ``labels`` None keeps the host's labels; claims are kept across updates.
        """
        i = self.index.get(record.host_id)
        if i is None:
            i = self.size
            self._reserve(i + 1)
            self.size += 1
            self.host_ids.append(record.host_id)
            self.index[record.host_id] = i
            self._capabilities.append(record.capabilities)
            self._labels.append(MappingProxyType({}))
            self.powered_on[i] = True
            changed = True
        else:
            changed = not (
                self.present[i]
                and self._capabilities[i] == record.capabilities
                and bool(self.online[i]) == record.online
                and bool(self.maintenance[i]) == record.maintenance
                and (labels is None or dict(self._labels[i]) == dict(labels))
                and (powered_on is None or bool(self.powered_on[i]) == powered_on)
            )
        if not changed:
            return i
        self.present[i] = True
        self.online[i] = record.online
        self.maintenance[i] = record.maintenance
        if powered_on is not None:
            self.powered_on[i] = powered_on
        self._set_capabilities(i, record.capabilities)
        if labels is not None:
            self._set_labels(i, labels)
        self.static_version += 1
        return i

    def remove_host(self, host_id: str) -> None:
        """The host left the fleet for good: no request will see it. Its claims stay recorded."""
        i = self.index.get(host_id)
        if i is not None and self.present[i]:
            self.present[i] = False
            self.static_version += 1

    def set_online(self, host_id: str, online: bool) -> None:
        """Record the host's liveness (its agent's state topic).

        Raises:
            FleetStateError: the host is not in the state.
        """
        self._set_flag(self.online, host_id, online)

    def set_maintenance(self, host_id: str, maintenance: bool) -> None:
        """Take the host out of scheduling (or back in); its VMs keep their claims.

        Raises:
            FleetStateError: the host is not in the state.
        """
        self._set_flag(self.maintenance, host_id, maintenance)

    def set_powered_on(self, host_id: str, powered_on: bool) -> None:
        """Record that the power manager switched a host off (standby) or on.

        Raises:
            FleetStateError: the host is not in the state.
        """
        self._set_flag(self.powered_on, host_id, powered_on)

    def set_labels(self, host_id: str, labels: Mapping[str, str]) -> None:
        """Replace the host's labels (zone, rack, pool...).

        Raises:
            FleetStateError: the host is not in the state.
        """
        i = self.index_of(host_id)
        if dict(self._labels[i]) != dict(labels):
            self._set_labels(i, labels)
            self.static_version += 1

    def set_usage(self, host_id: str, usage: Usage) -> None:
        """Overwrite a host's claimed totals with the store's (a resync; claims by name are kept).

        Raises:
            FleetStateError: the host is not in the state.
        """
        i = self.index_of(host_id)
        self.used_vcpus[i] = usage.vcpus
        self.used_memory_mib[i] = usage.memory_mib
        self.used_disk_gib[i] = usage.disk_gib
        self.vms[i] = usage.vms
        self._refresh_free(i)

    def usage(self, host_id: str) -> Usage:
        """What the VMs on ``host_id`` claim, as the store's ``usage()`` reports it.

        Raises:
            FleetStateError: the host is not in the state.
        """
        i = self.index_of(host_id)
        return Usage(
            vcpus=int(self.used_vcpus[i]),
            memory_mib=int(self.used_memory_mib[i]),
            disk_gib=int(self.used_disk_gib[i]),
            vms=int(self.vms[i]),
        )

    def resync(self, usage: Mapping[str, Usage]) -> list[str]:
        """Make every host's totals equal the store's ``usage`` (anti-entropy); returns the hosts that differed.

        Hosts missing from ``usage`` hold nothing. Claims by name are kept (release stays idempotent).
        """
        drifted = []
        empty = Usage()
        for host_id, i in self.index.items():
            want = usage.get(host_id, empty)
            if self.present[i] and self.usage(host_id) != want:
                drifted.append(host_id)
                self.set_usage(host_id, want)
        return drifted

    def _set_flag(self, column: BoolArray, host_id: str, value: bool) -> None:
        i = self.index_of(host_id)
        if bool(column[i]) != value:
            column[i] = value
            self.static_version += 1

    # -- claims ----------------------------------------------------------------------------------

    def claims(self, vm: str) -> list[Claim]:
        """What ``vm`` holds now (two claims while it migrates)."""
        return list(self._claims.get(vm, ()))

    def claim(self, host_index: int, request: PlacementRequest, *, force: bool = False) -> Claim:
        """Hold ``request``'s resources on slot ``host_index`` (O(1)).

        Raises:
            OverbookError: the host has not that much free (unless ``force``: adopting what a host
                already runs must succeed even when it is over its limits).
            FleetStateError: the VM already holds a claim on that host, or the slot is not a host.
        """
        return self._add_claim(
            request.vm,
            host_index,
            request.vcpus,
            request.memory_mib,
            request.disk_gib,
            request.group,
            force=force,
        )

    def adopt(
        self,
        vm: str,
        host_id: str,
        vcpus: int,
        memory_mib: int,
        disk_gib: int = 0,
        group: str | None = None,
    ) -> Claim:
        """Record a VM a host already runs (reconciliation, startup): a claim that may overbook.

        Raises:
            FleetStateError: the host is not in the state, or the VM already holds a claim there.
        """
        return self._add_claim(vm, self.index_of(host_id), vcpus, memory_mib, disk_gib, group, force=True)

    def release(self, vm: str, host_id: str | None = None) -> list[Claim]:
        """Give back what ``vm`` holds on ``host_id`` (on every host when None). Idempotent."""
        held = self._claims.get(vm)
        if not held:
            return []
        gone = [c for c in held if host_id is None or c.host_id == host_id]
        for c in gone:
            i = c.host_index
            self.used_vcpus[i] -= c.vcpus
            self.used_memory_mib[i] -= c.memory_mib
            self.used_disk_gib[i] -= c.disk_gib
            self.vms[i] -= 1
            self._refresh_free(i)
            if c.group is not None:
                members = self._group_hosts[c.group]
                members[i] -= 1
                if members[i] == 0:
                    del members[i]
                self._group_sizes[c.group] -= 1
                if self._group_sizes[c.group] == 0:
                    del self._group_sizes[c.group], self._group_hosts[c.group]
        kept = [c for c in held if c not in gone]
        if kept:
            self._claims[vm] = kept
        else:
            del self._claims[vm]
        return gone

    def _add_claim(
        self,
        vm: str,
        i: int,
        vcpus: int,
        memory_mib: int,
        disk_gib: int,
        group: str | None,
        *,
        force: bool,
    ) -> Claim:
        if not 0 <= i < self.size or not self.present[i]:
            raise FleetStateError(f"cannot claim for vm {vm!r}: slot {i} is not a host in the fleet state")
        host_id = self.host_ids[i]
        held = self._claims.setdefault(vm, [])
        if any(c.host_index == i for c in held):
            raise FleetStateError(f"vm {vm!r} already holds a claim on {host_id}; release it first")
        if not force and not self.fits(i, vcpus, memory_mib, disk_gib):
            if not held:
                del self._claims[vm]
            raise OverbookError(
                f"cannot claim {vcpus} vCPU, {memory_mib} MiB, {disk_gib} GiB on {host_id} for vm {vm!r}: "
                f"only {self.free_vcpus[i]} vCPU, {self.free_memory_mib[i]} MiB, "
                f"{self.free_disk_gib[i]} GiB free; select again"
            )
        claim = Claim(vm, i, host_id, vcpus, memory_mib, disk_gib, group)
        held.append(claim)
        self.used_vcpus[i] += vcpus
        self.used_memory_mib[i] += memory_mib
        self.used_disk_gib[i] += disk_gib
        self.vms[i] += 1
        self._refresh_free(i)
        if group is not None:
            members = self._group_hosts.setdefault(group, {})
            members[i] = members.get(i, 0) + 1
            self._group_sizes[group] = self._group_sizes.get(group, 0) + 1
        return claim
