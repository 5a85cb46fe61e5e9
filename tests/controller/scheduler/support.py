"""Builders for scheduler tests: host records, views, fleet states and random fleets (hypothesis).

The random fleets draw from small vocabularies (two architectures, a few CPU features, two zones and
racks) so that filters both pass and reject often, and include hosts that left (tombstones), VM
groups and claims, so every code path of the vectorised forms is exercised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from controller.scheduler import (
    CapacitySettings,
    FleetState,
    HostView,
    PlacementRequest,
    PowerSettings,
    SchedulerSettings,
)
from controller.scheduler.filters import HostFilter
from controller.scheduler.weighers import HostWeigher
from controller.state.store import HostRecord, Usage
from protocols.messages import Capabilities

ARCHES = ("x86_64", "aarch64", "i386")
FEATURES = ("vmx", "svm", "avx2", "aes", "sse4_2")
ZONES = ("a", "b")
RACKS = ("r1", "r2")
GROUPS = ("g1", "g2")


def caps(
    *,
    cores: int = 8,
    memory_mib: int = 16384,
    disk_gib: int = 100,
    arch: str = "x86_64",
    guest_arches: Sequence[str] | None = None,
    accel: str = "kvm",
    engine: str = "qemu",
    cpu_features: Sequence[str] = (),
    power_idle_w: float = 100.0,
    power_max_w: float = 300.0,
) -> Capabilities:
    return Capabilities(
        engine=engine,
        arch=arch,
        accel=accel,  # type: ignore[arg-type]
        cores=cores,
        memory_mib=memory_mib,
        disk_gib=disk_gib,
        guest_arches=list(guest_arches if guest_arches is not None else [arch]),
        cpu_features=list(cpu_features),
        power_idle_w=power_idle_w,
        power_max_w=power_max_w,
    )


def record(host_id: str, *, online: bool = True, maintenance: bool = False, **kwargs: object) -> HostRecord:
    return HostRecord(
        host_id=host_id,
        online=online,
        boot_id="b",
        address="127.0.0.1",
        agent_version="t",
        capabilities=caps(**kwargs),  # type: ignore[arg-type]
        maintenance=maintenance,
        state_reason="",
        first_seen=0.0,
        last_seen=0.0,
    )


def view(
    host_id: str = "h1",
    *,
    usage: Usage | None = None,
    labels: Mapping[str, str] | None = None,
    powered_on: bool = True,
    online: bool = True,
    maintenance: bool = False,
    group_members: Mapping[str, int] | None = None,
    group_sizes: Mapping[str, int] | None = None,
    **kwargs: object,
) -> HostView:
    return HostView.from_record(
        record(host_id, online=online, maintenance=maintenance, **kwargs),
        usage,
        labels=labels,
        powered_on=powered_on,
        group_members=group_members,
        group_sizes=group_sizes,
    )


def request(vm: str = "vm", **kwargs: object) -> PlacementRequest:
    return PlacementRequest(vm=vm, **kwargs)  # type: ignore[arg-type]


def fleet(
    *records: HostRecord, labels: Mapping[str, Mapping[str, str]] | None = None, **kw: object
) -> FleetState:
    return FleetState.from_records(records, {}, labels, **kw)  # type: ignore[arg-type]


def assert_filter_agrees(f: HostFilter, state: FleetState, req: PlacementRequest) -> None:
    """The filter's mask equals host_passes on every host, and its reason counts equal per-host reasons."""
    if not f.applies(req):
        return
    mask = f.mask(state, req)
    present = [i for i in range(state.size) if state.present[i]]
    expected = [f.host_passes(state.host(i), req) for i in present]
    assert [bool(mask[i]) for i in present] == expected, f.name
    rejected = np.zeros(len(state.present), dtype=np.bool_)
    reasons: dict[str, int] = {}
    for i, ok in zip(present, expected, strict=True):
        if not ok:
            rejected[i] = True
            reason = f.reason(state.host(i), req)
            reasons[reason] = reasons.get(reason, 0) + 1
    assert f.reason_counts(state, req, rejected) == reasons, f.name


def assert_weigher_agrees(w: HostWeigher, state: FleetState, req: PlacementRequest) -> None:
    """The weigher's vector form equals weigh_host on every host."""
    if not w.applies(req):
        return
    raw = np.asarray(w.weigh(state, req), dtype=np.float64)
    for i in range(state.size):
        if state.present[i]:
            assert np.isclose(raw[i], w.weigh_host(state.host(i), req), rtol=1e-9, atol=1e-9), (w.name, i)


# -- random fleets ------------------------------------------------------------------------------


@dataclass
class RandomFleet:
    """A drawn fleet: its state, the records behind it, and settings to schedule it with."""

    state: FleetState
    records: list[HostRecord]
    labels: dict[str, dict[str, str]]
    settings: SchedulerSettings
    removed: list[str] = field(default_factory=list)


@st.composite
def host_records(draw: st.DrawFn, host_id: str) -> tuple[HostRecord, dict[str, str]]:
    arch = draw(st.sampled_from(ARCHES[:2]))
    guests = [arch] + (["i386"] if arch == "x86_64" and draw(st.booleans()) else [])
    rec = HostRecord(
        host_id=host_id,
        online=draw(st.integers(0, 6)) != 0,
        boot_id="b",
        address="a",
        agent_version="t",
        capabilities=caps(
            cores=draw(st.sampled_from([2, 4, 8, 16])),
            memory_mib=draw(st.sampled_from([2048, 4096, 8192, 16384])),
            disk_gib=draw(st.sampled_from([0, 20, 100])),
            arch=arch,
            guest_arches=guests,
            accel=draw(st.sampled_from(["kvm", "tcg"])),
            engine=draw(st.sampled_from(["qemu", "sim"])),
            cpu_features=draw(st.lists(st.sampled_from(FEATURES), unique=True, max_size=4)),
        ),
        maintenance=draw(st.integers(0, 5)) == 0,
        state_reason="",
        first_seen=0.0,
        last_seen=0.0,
    )
    labels: dict[str, str] = {}
    if draw(st.booleans()):
        labels["zone"] = draw(st.sampled_from(ZONES))
    if draw(st.booleans()):
        labels["rack"] = draw(st.sampled_from(RACKS))
    return rec, labels


@st.composite
def settings_strategy(draw: st.DrawFn) -> SchedulerSettings:
    capacity = CapacitySettings(
        cpu_allocation_ratio=draw(st.sampled_from([1.0, 1.5, 4.0])),
        ram_allocation_ratio=draw(st.sampled_from([1.0, 1.25])),
        reserved_host_memory_mib=draw(st.sampled_from([0, 512])),
        reserved_host_cpus=draw(st.sampled_from([0, 1])),
    )
    power = PowerSettings(wake_powered_off_hosts=draw(st.booleans()))
    return SchedulerSettings(capacity=capacity, power=power)


@st.composite
def random_fleets(draw: st.DrawFn, max_hosts: int = 10, with_claims: bool = True) -> RandomFleet:
    """A fleet of 1..max_hosts hosts, some powered off or gone, with VMs (some in groups) on them."""
    settings = draw(settings_strategy())
    n = draw(st.integers(1, max_hosts))
    drawn = [draw(host_records(f"h{i}")) for i in range(n)]
    records = [r for r, _ in drawn]
    labels = {r.host_id: lab for r, lab in drawn}
    state = FleetState.from_records(records, {}, labels, capacity=settings.capacity)
    for r in records:
        if draw(st.integers(0, 6)) == 0:
            state.set_powered_on(r.host_id, False)
    if with_claims:
        for k in range(draw(st.integers(0, 3 * n))):
            i = draw(st.integers(0, n - 1))
            group = draw(st.sampled_from([None, *GROUPS]))
            req = PlacementRequest(
                vm=f"old-{k}",
                vcpus=draw(st.integers(1, 4)),
                memory_mib=draw(st.sampled_from([256, 512, 1024, 2048])),
                group=group,
                group_policy="anti-affinity" if group else None,
            )
            if state.fits(i, req.vcpus, req.memory_mib, req.disk_gib):
                state.claim(i, req)
    removed = [r.host_id for r in records if draw(st.integers(0, 8)) == 0]
    for host_id in removed:
        state.remove_host(host_id)
    return RandomFleet(state, records, labels, settings, removed)


@st.composite
def random_requests(draw: st.DrawFn, vm: str = "new", host_ids: Sequence[str] = ()) -> PlacementRequest:
    group = draw(st.sampled_from([None, *GROUPS]))
    policy = (
        draw(st.sampled_from(["affinity", "anti-affinity", "soft-affinity", "soft-anti-affinity"]))
        if group
        else None
    )
    ids = list(host_ids) or ["h0"]
    source = draw(st.sampled_from([None, *ids]))
    return PlacementRequest(
        vm=vm,
        vcpus=draw(st.integers(1, 8)),
        memory_mib=draw(st.sampled_from([256, 512, 1024, 2048, 4096, 8192])),
        disk_gib=draw(st.sampled_from([0, 0, 10, 50])),
        arch=draw(st.sampled_from(ARCHES)),
        required_features=tuple(draw(st.lists(st.sampled_from(FEATURES), unique=True, max_size=2))),
        require_labels=draw(
            st.sampled_from([{}, {}, {"zone": "a"}, {"rack": "r1"}, {"zone": "b", "rack": "r2"}])
        ),
        accel=draw(st.sampled_from([None, None, "kvm", "tcg"])),
        engine=draw(st.sampled_from([None, None, "qemu", "sim", "xen"])),
        group=group,
        group_policy=policy,  # type: ignore[arg-type]
        hosts=tuple(draw(st.lists(st.sampled_from(ids), unique=True, max_size=2)))
        if draw(st.booleans())
        else (),
        avoid_hosts=tuple(draw(st.lists(st.sampled_from(ids), unique=True, max_size=2))),
        source_host=source,
        dirty_mib_s=draw(st.sampled_from([0.0, 50.0, 2000.0])),
        policy=draw(st.sampled_from([None, "pack", "spread", "power-saving", "best-fit"])),
    )
