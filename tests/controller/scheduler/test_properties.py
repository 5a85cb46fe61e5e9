"""Properties on random fleets and requests (hypothesis): both forms agree, nothing overbooks, all explained.

Random fleets mix architectures, accels, engines, CPU features, zone and rack labels, hosts offline,
in maintenance, powered off and gone, existing VMs in groups, and random capacity settings.
"""

from __future__ import annotations

import itertools
from collections import Counter

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.scheduler import FleetState, PlacementRequest, Scheduler
from controller.scheduler.filters import default_filters
from controller.scheduler.weighers import default_weighers, normalise_values
from tests.controller.scheduler.support import (
    RandomFleet,
    assert_filter_agrees,
    assert_weigher_agrees,
    random_fleets,
    random_requests,
)

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _with_source_rack(fleet: RandomFleet, req: PlacementRequest) -> PlacementRequest:
    if req.source_host is None or req.source_host not in fleet.state.index:
        return req
    rack = fleet.state.labels_of(fleet.state.index[req.source_host]).get("rack")
    return msgspec.structs.replace(req, source_rack=rack)


def _all_pass(scheduler: Scheduler, state: FleetState, slot: int, req: PlacementRequest) -> bool:
    host = state.host(slot)
    return all(f.host_passes(host, req) for f in scheduler.filters if f.applies(req))


@st.composite
def fleet_and_request(draw: st.DrawFn) -> tuple[RandomFleet, PlacementRequest]:
    fleet = draw(random_fleets())
    return fleet, draw(random_requests(host_ids=[r.host_id for r in fleet.records]))


@PROPERTY
@given(fleet_and_request())
def test_every_filter_mask_agrees_with_host_passes(case: tuple[RandomFleet, PlacementRequest]) -> None:
    """For every filter, mask() equals host_passes() on every host, and the reason counts agree."""
    fleet, req = case
    for f in default_filters(fleet.settings):
        assert_filter_agrees(f, fleet.state, req)


@PROPERTY
@given(fleet_and_request())
def test_every_weigher_vector_agrees_with_weigh_host(case: tuple[RandomFleet, PlacementRequest]) -> None:
    """For every weigher, weigh() equals weigh_host() on every host."""
    fleet, req = case
    req = _with_source_rack(fleet, req)
    for w in default_weighers(fleet.settings):
        assert_weigher_agrees(w, fleet.state, req)


@PROPERTY
@given(fleet_and_request())
def test_decision_matches_a_per_host_reference(case: tuple[RandomFleet, PlacementRequest]) -> None:
    """The vectorised decision equals one computed host by host with host_passes and weigh_host."""
    fleet, req = case
    state, scheduler = fleet.state, Scheduler(fleet.state, fleet.settings)
    decision = scheduler.select(req)
    req = _with_source_rack(fleet, req)
    passing: list[int] = []
    reasons: Counter[str] = Counter()
    for i in range(state.size):
        if not state.present[i]:
            continue
        host = state.host(i)
        failed = next((f for f in scheduler.filters if f.applies(req) and not f.host_passes(host, req)), None)
        if failed is None:
            passing.append(i)
        else:
            reasons[failed.reason(host, req)] += 1
    ex = decision.explanation
    assert ex.candidates == len(passing)
    assert ex.rejected == dict(reasons)
    assert sum(ex.rejected.values()) == sum(ex.filtered.values()) == ex.hosts - ex.candidates
    if not passing:
        assert decision.refusal is not None and decision.host_id is None
        assert decision.refusal.rejected == dict(reasons)
        return
    multipliers = fleet.settings.multipliers(req.policy)
    totals = [0.0] * len(passing)
    for w in scheduler.weighers:
        m = multipliers.get(w.name, 0.0)
        if m and w.applies(req):
            values = [w.weigh_host(state.host(i), req) for i in passing]
            for k, v in enumerate(normalise_values(values)):
                totals[k] += m * v
    assert decision.host_index in passing
    assert totals[passing.index(decision.host_index)] >= max(totals) - 1e-6


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_fleets(), st.data())
def test_many_claims_never_overbook_and_keep_every_hard_constraint(
    fleet: RandomFleet, data: st.DataObject
) -> None:
    """Select and claim 30 random requests: every choice passes every filter, no host goes negative."""
    state, scheduler = fleet.state, Scheduler(fleet.state, fleet.settings)
    ids = [r.host_id for r in fleet.records]
    for k in range(30):
        req = data.draw(random_requests(vm=f"new-{k}", host_ids=ids))
        decision = scheduler.select(req)
        ex = decision.explanation
        assert sum(ex.rejected.values()) == ex.hosts - ex.candidates
        if decision.refusal is not None:
            assert ex.candidates == 0 and decision.refusal.message.startswith(
                f"no host can take vm '{req.vm}'"
            )
            continue
        assert _all_pass(scheduler, state, decision.host_index, req)
        scheduler.claim(decision, req)
        assert (state.free_vcpus >= 0).all() and (state.free_memory_mib >= 0).all()
        assert (state.free_disk_gib[state.present & (state.disk_gib > 0)] >= 0).all()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_fleets(max_hosts=8), st.data())
def test_batches_keep_groups_and_capacity_and_leave_the_state_untouched(
    fleet: RandomFleet, data: st.DataObject
) -> None:
    """A planned batch changes nothing; committed, it overbooks nothing and keeps its hard groups."""
    state, scheduler = fleet.state, Scheduler(fleet.state, fleet.settings)
    ids = [r.host_id for r in fleet.records]
    n = data.draw(st.integers(1, 8))
    requests = [data.draw(random_requests(vm=f"b-{k}", host_ids=ids)) for k in range(n)]
    requests = [msgspec.structs.replace(r, source_host=None) for r in requests]
    before = (state.used_memory_mib.tolist(), state.used_vcpus.tolist(), dict(state._group_sizes))
    batch = scheduler.select_batch(requests)
    assert (state.used_memory_mib.tolist(), state.used_vcpus.tolist(), dict(state._group_sizes)) == before
    for d in batch.decisions:
        assert sum(d.explanation.rejected.values()) == d.explanation.hosts - d.explanation.candidates
    if not batch.ok:
        assert batch.unplaced == [r.vm for r in requests] and batch.message
        return
    claims = scheduler.commit_batch(requests, batch)
    assert (state.free_vcpus >= 0).all() and (state.free_memory_mib >= 0).all()
    for r, c in zip(requests, claims, strict=True):
        if c is None:
            assert r.best_effort
            continue
        if r.group_policy == "anti-affinity":
            assert state.group_hosts(r.group or "")[c.host_index] == 1
        if r.group_policy == "affinity":
            assert len(state.group_hosts(r.group or "")) == 1
        host = state.host(c.host_index)
        others = [
            f
            for f in scheduler.filters
            if f.name not in ("capacity", "group_affinity", "group_anti_affinity")
        ]
        assert all(f.host_passes(host, r) for f in others if f.applies(r))


@settings(max_examples=120, deadline=None)
@given(random_fleets(max_hosts=6, with_claims=False), st.integers(1, 5), st.sampled_from([512, 2048, 6144]))
def test_an_anti_affinity_batch_fits_exactly_when_some_assignment_does(
    fleet: RandomFleet, members: int, memory_mib: int
) -> None:
    """Against brute force over all assignments: the batch succeeds if and only if one exists."""
    state, scheduler = fleet.state, Scheduler(fleet.state, fleet.settings)
    requests = [
        PlacementRequest(
            vm=f"m{k}",
            memory_mib=memory_mib * (1 + k % 2),
            vcpus=1 + k,
            group="grp",
            group_policy="anti-affinity",
            required_features=("vmx",) if k == 0 else (),
        )
        for k in range(members)
    ]
    slots = [i for i in range(state.size) if state.present[i]]
    fits = [[i for i in slots if _all_pass(scheduler, state, i, r)] for r in requests]
    exists = any(
        all(choice[k] in fits[k] for k in range(members)) for choice in itertools.permutations(slots, members)
    )
    assert scheduler.select_batch(requests).ok == exists
