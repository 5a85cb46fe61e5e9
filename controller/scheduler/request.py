"""What the scheduler is asked: one VM's needs and constraints, and the hints an operator may give.

:class:`SchedulingHints` is what the API accepts beside a VM spec on create (unknown fields are an
error, as with every input a person types). :class:`PlacementRequest` is the scheduler's own view of
one VM to place: resources from the spec, constraints from the hints, and for a migration the
source host and the guest's dirty rate. Both are frozen msgspec Structs, so they travel as JSON in
the API and as MessagePack anywhere else.
"""

from __future__ import annotations

import msgspec

from protocols.rest import GroupPolicy, SchedulingHints
from protocols.vmspec import VmSpec

#: Hard policies are filters (a host that breaks them is never chosen); soft ones are weighers.
HARD_GROUP_POLICIES: frozenset[str] = frozenset({"affinity", "anti-affinity"})


class PlacementRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One VM to place: its resources and every constraint the filters and weighers read."""

    vm: str
    vcpus: int = 1
    memory_mib: int = 512
    disk_gib: int = 0
    arch: str = "x86_64"
    required_features: tuple[str, ...] = ()
    require_labels: dict[str, str] = {}
    #: Acceleration the host must offer (e.g. "kvm"), and the engine it must run (e.g. "qemu").
    accel: str | None = None
    engine: str | None = None
    group: str | None = None
    group_policy: GroupPolicy | None = None
    #: Allow list (empty: any host) and deny list of host ids.
    hosts: tuple[str, ...] = ()
    avoid_hosts: tuple[str, ...] = ()
    #: For a migration: where the VM runs now (never a target) and how fast it dirties memory.
    source_host: str | None = None
    dirty_mib_s: float = 0.0
    #: The source host's rack label; the scheduler fills it in from the fleet state when missing.
    source_rack: str | None = None
    #: A named policy (a set of weigher multipliers); None uses the scheduler's default.
    policy: str | None = None
    best_effort: bool = False

    @classmethod
    def from_spec(cls, spec: VmSpec, hints: SchedulingHints | None = None) -> PlacementRequest:
        """The request for creating ``spec``, shaped by the operator's ``hints``."""
        h = hints or SchedulingHints()
        policy = h.group_policy or ("anti-affinity" if h.group else None)
        return cls(
            vm=spec.name,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            disk_gib=spec.disk_gib,
            arch=spec.arch,
            required_features=tuple(sorted(set(h.required_features))),
            require_labels=dict(h.require),
            accel=h.accel,
            engine=h.engine,
            group=h.group,
            group_policy=policy,
            hosts=(h.start_on,) if h.start_on else tuple(h.hosts),
            avoid_hosts=tuple(h.avoid_hosts),
            dirty_mib_s=spec.workload.dirty_mib_s,
            policy=h.policy,
            best_effort=h.best_effort,
        )

    @classmethod
    def for_migration(
        cls,
        spec: VmSpec,
        source_host: str,
        hints: SchedulingHints | None = None,
        dirty_mib_s: float | None = None,
    ) -> PlacementRequest:
        """The request for moving ``spec`` off ``source_host``; ``dirty_mib_s`` is the measured rate."""
        base = cls.from_spec(spec, hints)
        rate = spec.workload.dirty_mib_s if dirty_mib_s is None else dirty_mib_s
        return msgspec.structs.replace(base, source_host=source_host, dirty_mib_s=rate)

    def describe(self) -> str:
        """What the VM asks for, as the refusal message names it: ``1 vCPU, 8.0 GiB RAM``."""
        text = f"{self.vcpus} vCPU, {format_mib(self.memory_mib)} RAM"
        return text + (f", {self.disk_gib} GiB disk" if self.disk_gib else "")


def format_mib(value: int) -> str:
    """``1.5 GiB`` from 1536, ``512 MiB`` from 512."""
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"
