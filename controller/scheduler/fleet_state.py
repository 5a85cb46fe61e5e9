"""The fleet as the scheduler holds it: one numpy column per host attribute, updated in O(1) per claim.

:class:`HostArrays` is the read side the filters' ``mask`` and the weighers' ``weigh`` work on: per-host
capacity, claimed and free resources, state flags, and capabilities encoded for vector tests (guest
architectures and CPU features as bitsets, accel, engine and label values as integer codes).
:class:`FleetState` adds the writes: hosts joining, changing and leaving, and VM claims and releases.

Nothing here touches SQLite or the bus. The controller builds a state with
:meth:`FleetState.from_records` from its store and keeps it in step; a trace-driven simulator builds
one from synthetic records and never needs a store at all.

Host slots are never reused for another host and never move, so an index stays valid: a host that
leaves becomes a tombstone (``present`` False) that no filter lets through and no count includes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import CapacitySettings
from controller.store import HostRecord, Usage, VmRecord
from protocols.messages import Capabilities

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
CodeArray = npt.NDArray[np.int32]
BitArray = npt.NDArray[np.uint64]

#: VM label the controller may use to persist a VM's group (``from_records`` reads it).
GROUP_LABEL = "fleetvisor.io/group"
#: Code of "no value" in the accel, engine and label columns; lookups of unknown values return
#: ``NO_MATCH``, which no host carries.
ABSENT = -1
NO_MATCH = -2

_BOOL_COLUMNS = ("present", "online", "maintenance", "powered_on")
_INT_COLUMNS = (
    "cores",
    "memory_mib",
    "disk_gib",
    "cap_vcpus",
    "cap_memory_mib",
    "cap_disk_gib",
    "used_vcpus",
    "used_memory_mib",
    "used_disk_gib",
    "vms",
    "free_vcpus",
    "free_memory_mib",
    "free_disk_gib",
)
_FLOAT_COLUMNS = (
    "power_idle_w",
    "power_max_w",
    "inv_cap_vcpus",
    "inv_cap_memory_mib",
    "load_vcpus",
    "load_memory_mib",
    "in_use_sign",
)
_CODE_COLUMNS = ("accel_code", "engine_code")


class FleetStateError(Exception):
    """A claim or host change the state cannot apply; the message names the VM or host."""


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


class HostArrays:
    """Per-host columns and the vocabularies that encode capabilities; read by filters and weighers.

    Columns have one slot per host ever added (``size``); slots of hosts that left have ``present``
    False. Arrays may be longer than ``size`` (room to grow); the extra slots are never present.
    """

    present: BoolArray
    online: BoolArray
    maintenance: BoolArray
    powered_on: BoolArray
    cores: IntArray
    memory_mib: IntArray
    disk_gib: IntArray
    cap_vcpus: IntArray
    cap_memory_mib: IntArray
    cap_disk_gib: IntArray
    used_vcpus: IntArray
    used_memory_mib: IntArray
    used_disk_gib: IntArray
    vms: IntArray
    free_vcpus: IntArray
    free_memory_mib: IntArray
    free_disk_gib: IntArray
    power_idle_w: FloatArray
    power_max_w: FloatArray
    #: Derived, kept in step so weighers do a few float operations and no conversions:
    #: ``1 / max(cap, 1)``, the claimed share ``used / max(cap, 1)``, and +1.0 for a host that runs
    #: VMs, -1.0 for an empty one.
    inv_cap_vcpus: FloatArray
    inv_cap_memory_mib: FloatArray
    load_vcpus: FloatArray
    load_memory_mib: FloatArray
    in_use_sign: FloatArray
    accel_code: CodeArray
    engine_code: CodeArray
    arch_bits: BitArray
    #: Shape (slots, words): bit ``b`` of word ``w`` is CPU feature number ``64 * w + b``.
    feature_bits: BitArray

    def __init__(self, capacity: CapacitySettings | None = None) -> None:
        self.capacity = capacity or CapacitySettings()
        self.size = 0
        self.host_ids: list[str] = []
        self.index: dict[str, int] = {}
        #: Bumped whenever anything a static filter reads changes (not on claims).
        self.static_version = 0
        #: Bumped on every change of claimed resources (claims, releases, usage resyncs, host changes).
        self.usage_version = 0
        self.label_codes: dict[str, CodeArray] = {}
        self._slots = 0
        self._capabilities: list[Capabilities] = []
        self._labels: list[Mapping[str, str]] = []
        self._arch_bit: dict[str, int] = {}
        self._accel_code: dict[str, int] = {}
        self._engine_code: dict[str, int] = {}
        self._feature_bit: dict[str, int] = {}
        self._label_value: dict[str, dict[str, int]] = {}
        self._group_hosts: dict[str, dict[int, int]] = {}
        self._group_sizes: dict[str, int] = {}
        for name in _BOOL_COLUMNS:
            setattr(self, name, np.zeros(0, dtype=np.bool_))
        for name in _INT_COLUMNS:
            setattr(self, name, np.zeros(0, dtype=np.int64))
        for name in _FLOAT_COLUMNS:
            setattr(self, name, np.zeros(0, dtype=np.float64))
        for name in _CODE_COLUMNS:
            setattr(self, name, np.full(0, ABSENT, dtype=np.int32))
        self.arch_bits = np.zeros(0, dtype=np.uint64)
        self.feature_bits = np.zeros((0, 1), dtype=np.uint64)

    # -- reading ---------------------------------------------------------------------------------

    @property
    def host_count(self) -> int:
        """Hosts present now (tombstones of hosts that left excluded)."""
        return int(np.count_nonzero(self.present))

    def index_of(self, host_id: str) -> int:
        """The slot of ``host_id``.

        Raises:
            FleetStateError: the host is not known (or has left).
        """
        i = self.index.get(host_id)
        if i is None or not self.present[i]:
            raise FleetStateError(f"host {host_id!r} is not in the scheduler's fleet state")
        return i

    def arch_bit(self, arch: str) -> int:
        """The bit of guest architecture ``arch`` in ``arch_bits`` (0 when no host runs it)."""
        return self._arch_bit.get(arch, 0)

    def accel_code_of(self, accel: str) -> int:
        return self._accel_code.get(accel, NO_MATCH)

    def engine_code_of(self, engine: str) -> int:
        return self._engine_code.get(engine, NO_MATCH)

    def feature_words(self, features: Iterable[str]) -> list[tuple[int, np.uint64]] | None:
        """``(word, bits)`` pairs a host's ``feature_bits`` must contain; None if no host has one of them."""
        words: dict[int, int] = {}
        for name in features:
            bit = self._feature_bit.get(name)
            if bit is None:
                return None
            words[bit // 64] = words.get(bit // 64, 0) | (1 << (bit % 64))
        return [(w, np.uint64(b)) for w, b in sorted(words.items())]

    def label_code(self, key: str, value: str) -> int:
        """The code of ``key=value`` in ``label_codes[key]`` (``NO_MATCH`` when no host has it)."""
        return self._label_value.get(key, {}).get(value, NO_MATCH)

    def label_column(self, key: str) -> CodeArray | None:
        return self.label_codes.get(key)

    def labels_of(self, index: int) -> Mapping[str, str]:
        return self._labels[index]

    def group_hosts(self, group: str) -> Mapping[int, int]:
        """Members of ``group`` per host slot (only slots with members)."""
        return self._group_hosts.get(group, {})

    def group_size(self, group: str) -> int:
        return self._group_sizes.get(group, 0)

    def group_column(self, group: str) -> IntArray:
        """Members of ``group`` on every slot, as a column."""
        column = np.zeros(self._slots, dtype=np.int64)
        members = self._group_hosts.get(group)
        if members:
            column[np.fromiter(members.keys(), np.int64, len(members))] = np.fromiter(
                members.values(), np.int64, len(members)
            )
        return column

    def host(self, ref: int | str) -> HostView:
        """The per-host view of slot ``ref`` (or host id), as ``host_passes`` and ``weigh_host`` take it.

        Raises:
            FleetStateError: a host id that is not in the state.
        """
        i = self.index_of(ref) if isinstance(ref, str) else ref
        caps = self._capabilities[i]
        members = {g: hosts[i] for g, hosts in self._group_hosts.items() if i in hosts}
        return HostView(
            host_id=self.host_ids[i],
            arch=caps.arch,
            accel=caps.accel,
            engine=caps.engine,
            cores=int(self.cores[i]),
            memory_mib=int(self.memory_mib[i]),
            disk_gib=int(self.disk_gib[i]),
            guest_arches=frozenset(caps.guest_arches),
            cpu_features=frozenset(caps.cpu_features),
            online=bool(self.online[i]),
            maintenance=bool(self.maintenance[i]),
            powered_on=bool(self.powered_on[i]),
            labels=self._labels[i],
            used_vcpus=int(self.used_vcpus[i]),
            used_memory_mib=int(self.used_memory_mib[i]),
            used_disk_gib=int(self.used_disk_gib[i]),
            vms=int(self.vms[i]),
            power_idle_w=float(self.power_idle_w[i]),
            power_max_w=float(self.power_max_w[i]),
            group_members=MappingProxyType(members),
            group_sizes=MappingProxyType(dict(self._group_sizes)),
        )

    def free(self, capacity: CapacitySettings | None = None) -> tuple[IntArray, IntArray, IntArray]:
        """Free (vCPUs, MiB, GiB) per slot; under other ``capacity`` settings than the state's when given."""
        c = capacity or self.capacity
        if c == self.capacity:
            return self.free_vcpus, self.free_memory_mib, self.free_disk_gib
        vcpus = np.trunc((self.cores - c.reserved_host_cpus) * c.cpu_allocation_ratio)
        memory = np.trunc((self.memory_mib - c.reserved_host_memory_mib) * c.ram_allocation_ratio)
        disk = np.trunc((self.disk_gib - c.reserved_host_disk_gib) * c.disk_allocation_ratio)
        return (
            vcpus.astype(np.int64) - self.used_vcpus,
            memory.astype(np.int64) - self.used_memory_mib,
            disk.astype(np.int64) - self.used_disk_gib,
        )

    def capacity_under(self, capacity: CapacitySettings | None = None) -> tuple[IntArray, IntArray, IntArray]:
        """What each slot offers in (vCPUs, MiB, GiB) under ``capacity`` (the state's when None)."""
        c = capacity or self.capacity
        if c == self.capacity:
            return self.cap_vcpus, self.cap_memory_mib, self.cap_disk_gib
        vcpus = np.trunc((self.cores - c.reserved_host_cpus) * c.cpu_allocation_ratio)
        memory = np.trunc((self.memory_mib - c.reserved_host_memory_mib) * c.ram_allocation_ratio)
        disk = np.trunc((self.disk_gib - c.reserved_host_disk_gib) * c.disk_allocation_ratio)
        return vcpus.astype(np.int64), memory.astype(np.int64), disk.astype(np.int64)

    def fits(self, index: int, vcpus: int, memory_mib: int, disk_gib: int) -> bool:
        """Whether slot ``index`` has that much free (O(1))."""
        return bool(
            self.present[index]
            and self.free_vcpus[index] >= vcpus
            and self.free_memory_mib[index] >= memory_mib
            and self.free_disk_gib[index] >= disk_gib
        )

    # -- writing (used by FleetState) ------------------------------------------------------------

    def _reserve(self, slots: int) -> None:
        """Make room for ``slots`` slots (doubling, so joins one at a time stay amortised O(1))."""
        if slots <= self._slots:
            return
        new = max(slots, self._slots * 2, 16)
        for name in (*_BOOL_COLUMNS, *_INT_COLUMNS, *_FLOAT_COLUMNS):
            setattr(self, name, _grown(getattr(self, name), new, 0))
        for name in _CODE_COLUMNS:
            setattr(self, name, _grown(getattr(self, name), new, ABSENT))
        for key, column in self.label_codes.items():
            self.label_codes[key] = _grown(column, new, ABSENT)
        self.arch_bits = _grown(self.arch_bits, new, 0)
        bits = np.zeros((new, self.feature_bits.shape[1]), dtype=np.uint64)
        bits[: self._slots] = self.feature_bits[: self._slots]
        self.feature_bits = bits
        self._slots = new

    def _code(self, vocabulary: dict[str, int], value: str) -> int:
        return vocabulary.setdefault(value, len(vocabulary))

    def _set_capabilities(self, i: int, caps: Capabilities) -> None:
        self._capabilities[i] = caps
        self.cores[i] = caps.cores
        self.memory_mib[i] = caps.memory_mib
        self.disk_gib[i] = caps.disk_gib
        self.cap_vcpus[i] = self.capacity.vcpus(caps.cores)
        self.cap_memory_mib[i] = self.capacity.memory_mib(caps.memory_mib)
        self.cap_disk_gib[i] = self.capacity.disk_gib(caps.disk_gib)
        self.inv_cap_vcpus[i] = 1.0 / max(int(self.cap_vcpus[i]), 1)
        self.inv_cap_memory_mib[i] = 1.0 / max(int(self.cap_memory_mib[i]), 1)
        self.power_idle_w[i] = caps.power_idle_w
        self.power_max_w[i] = caps.power_max_w
        self.accel_code[i] = self._code(self._accel_code, caps.accel)
        self.engine_code[i] = self._code(self._engine_code, caps.engine)
        arch_bits = 0
        for arch in {caps.arch, *caps.guest_arches}:
            if arch not in self._arch_bit:
                if len(self._arch_bit) >= 64:
                    raise FleetStateError(f"too many guest architectures to encode {arch!r}")
                self._arch_bit[arch] = 1 << len(self._arch_bit)
            arch_bits |= self._arch_bit[arch]
        self.arch_bits[i] = np.uint64(arch_bits)
        row = np.zeros(self.feature_bits.shape[1], dtype=np.uint64)
        for feature in caps.cpu_features:
            bit = self._feature_bit.setdefault(feature, len(self._feature_bit))
            if bit // 64 >= self.feature_bits.shape[1]:
                wider = np.zeros((self._slots, bit // 64 + 1), dtype=np.uint64)
                wider[:, : self.feature_bits.shape[1]] = self.feature_bits
                self.feature_bits = wider
                row = np.concatenate([row, np.zeros(wider.shape[1] - len(row), dtype=np.uint64)])
            row[bit // 64] |= np.uint64(1 << (bit % 64))
        self.feature_bits[i] = row
        self._refresh_free(i)

    def _set_labels(self, i: int, labels: Mapping[str, str]) -> None:
        self._labels[i] = MappingProxyType(dict(labels))
        for column in self.label_codes.values():
            column[i] = ABSENT
        for key, value in labels.items():
            if key not in self.label_codes:
                self.label_codes[key] = np.full(self._slots, ABSENT, dtype=np.int32)
            self.label_codes[key][i] = self._code(self._label_value.setdefault(key, {}), value)

    def _refresh_free(self, i: int) -> None:
        self.usage_version += 1
        self.free_vcpus[i] = self.cap_vcpus[i] - self.used_vcpus[i]
        self.free_memory_mib[i] = self.cap_memory_mib[i] - self.used_memory_mib[i]
        self.free_disk_gib[i] = self.cap_disk_gib[i] - self.used_disk_gib[i]
        self.load_vcpus[i] = self.used_vcpus[i] * self.inv_cap_vcpus[i]
        self.load_memory_mib[i] = self.used_memory_mib[i] * self.inv_cap_memory_mib[i]
        self.in_use_sign[i] = 1.0 if self.vms[i] > 0 else -1.0


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


def _grown(column: npt.NDArray[Any], slots: int, fill: int) -> npt.NDArray[Any]:
    out = np.full(slots, fill, dtype=column.dtype)
    out[: len(column)] = column
    return out
