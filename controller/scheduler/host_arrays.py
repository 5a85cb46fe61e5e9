"""The read side of the fleet state: one numpy column per host attribute, and how the columns grow.

:class:`HostArrays` is what the filters' ``mask`` and the weighers' ``weigh`` work on: per-host
capacity, claimed and free resources, state flags, and capabilities encoded for vector tests (guest
architectures and CPU features as bitsets, accel, engine and label values as integer codes). It also
holds the low-level slot writes (growing the columns, encoding a host's capabilities and labels,
refreshing its free resources) that :class:`~controller.scheduler.fleet_state.FleetState` builds on.

Imports: numpy, :mod:`protocols.messages` and the scheduler's leaf modules
(:mod:`~controller.scheduler.host_view`, :mod:`~controller.scheduler.settings`); never
:mod:`~controller.scheduler.fleet_state`, which imports this module, and not the store directly.

Host slots are never reused for another host and never move, so an index stays valid: a host that
leaves becomes a tombstone (``present`` False) that no filter lets through and no count includes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.scheduler.host_view import HostView
from controller.scheduler.settings import CapacitySettings
from protocols.messages import Capabilities

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
CodeArray = npt.NDArray[np.int32]
BitArray = npt.NDArray[np.uint64]

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
        """The code of ``accel`` in ``accel_code`` (``NO_MATCH`` when no host has it)."""
        return self._accel_code.get(accel, NO_MATCH)

    def engine_code_of(self, engine: str) -> int:
        """The code of ``engine`` in ``engine_code`` (``NO_MATCH`` when no host has it)."""
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
        """The column of label ``key``'s value codes (None when no host ever had the key)."""
        return self.label_codes.get(key)

    def labels_of(self, index: int) -> Mapping[str, str]:
        """The labels of slot ``index``."""
        return self._labels[index]

    def group_hosts(self, group: str) -> Mapping[int, int]:
        """Members of ``group`` per host slot (only slots with members)."""
        return self._group_hosts.get(group, {})

    def group_size(self, group: str) -> int:
        """Members of ``group`` on all hosts."""
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


def _grown(column: npt.NDArray[Any], slots: int, fill: int) -> npt.NDArray[Any]:
    out = np.full(slots, fill, dtype=column.dtype)
    out[: len(column)] = column
    return out
