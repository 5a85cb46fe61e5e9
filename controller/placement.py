"""First placement: best fit on free memory, then vCPUs, with a refusal that explains itself.

A pure function of (request, hosts, claimed usage); the caller holds the claim lock and persists the
choice in the same step, so concurrent creates can never overbook a host. The scheduler work
replaces this with filters and weighers; the explanation format stays.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import msgspec

from controller.store import HostRecord, Usage
from protocols.vmspec import VmSpec


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    #: vCPUs per physical core a host may promise (Nova's cpu_allocation_ratio).
    cpu_allocation_ratio: float = 4.0
    #: Memory is not overcommitted by default: a VM's RAM must really be there.
    ram_allocation_ratio: float = 1.0
    disk_allocation_ratio: float = 1.0
    #: Memory kept back for the host itself.
    reserved_host_memory_mib: int = 512


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    host_id: str
    free_memory_mib: int
    free_vcpus: int
    score: float


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    host_id: str
    candidates: list[Candidate]


class NoValidHost(msgspec.Struct, frozen=True, kw_only=True):
    """Why no host could take the request: counts of hosts removed by each reason."""

    reason: str
    rejected: dict[str, int]


_REASONS = {
    "offline": "offline",
    "maintenance": "in maintenance",
    "arch": "cannot run {arch} guests",
    "memory": "lack memory",
    "vcpus": "lack vCPUs",
    "disk": "lack disk",
}


def free_capacity(host: HostRecord, used: Usage, settings: PlacementSettings) -> tuple[int, int, int]:
    """(free vCPUs, free MiB, free GiB of disk) on ``host`` after its claims."""
    caps = host.capabilities
    vcpus = int(caps.cores * settings.cpu_allocation_ratio) - used.vcpus
    memory = (
        int((caps.memory_mib - settings.reserved_host_memory_mib) * settings.ram_allocation_ratio)
        - used.memory_mib
    )
    disk = int(caps.disk_gib * settings.disk_allocation_ratio) - used.disk_gib
    return vcpus, memory, disk


def place(
    spec: VmSpec, hosts: list[HostRecord], usage: dict[str, Usage], settings: PlacementSettings
) -> Placement | NoValidHost:
    """Choose the online host that fits ``spec`` most tightly, or explain why none fits."""
    rejected: Counter[str] = Counter()
    fits: list[Candidate] = []
    best_free_memory = 0
    for host in hosts:
        if not host.online:
            rejected["offline"] += 1
            continue
        if host.maintenance:
            rejected["maintenance"] += 1
            continue
        caps = host.capabilities
        if spec.arch != caps.arch and spec.arch not in caps.guest_arches:
            rejected["arch"] += 1
            continue
        vcpus, memory, disk = free_capacity(host, usage.get(host.host_id, Usage()), settings)
        best_free_memory = max(best_free_memory, memory)
        if memory < spec.memory_mib:
            rejected["memory"] += 1
        elif vcpus < spec.vcpus:
            rejected["vcpus"] += 1
        elif disk < spec.disk_gib:
            rejected["disk"] += 1
        else:
            # Best fit: the least memory left over wins; vCPUs break ties.
            left_mem = memory - spec.memory_mib
            left_cpu = vcpus - spec.vcpus
            fits.append(
                Candidate(
                    host_id=host.host_id,
                    free_memory_mib=memory,
                    free_vcpus=vcpus,
                    score=-(left_mem + left_cpu / 1000),
                )
            )
    if fits:
        fits.sort(key=lambda c: (-c.score, c.host_id))
        return Placement(host_id=fits[0].host_id, candidates=fits[:5])
    return NoValidHost(reason=explain(spec, len(hosts), rejected, best_free_memory), rejected=dict(rejected))


def explain(spec: VmSpec, host_count: int, rejected: Counter[str], best_free_memory: int) -> str:
    want = f"{spec.vcpus} vCPU, {_mib(spec.memory_mib)} RAM" + (
        f", {spec.disk_gib} GiB disk" if spec.disk_gib else ""
    )
    if host_count == 0:
        return (
            f"no host can take vm {spec.name!r} ({want}): no hosts have joined; "
            "start an agent with `fleetvisor agent`"
        )
    parts = []
    for key, count in rejected.most_common():
        text = _REASONS[key].format(arch=spec.arch)
        noun = "host" if count == 1 else "hosts"
        parts.append(f"{count} {noun} {text}" if key not in ("offline", "maintenance") else f"{count} {text}")
    detail = "; ".join(parts)
    hint = ""
    if rejected.get("memory"):
        hint = f"; the most free memory on any host is {_mib(best_free_memory)}"
    return f"no host can take vm {spec.name!r} ({want}): {detail}{hint}"


def _mib(value: int) -> str:
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"
