"""Scheduler.select_batch: groups planned as a whole, most constrained first, all or nothing."""

from __future__ import annotations

import numpy as np
import pytest

from controller.scheduler import (
    FleetState,
    FleetStateError,
    PlacementRequest,
    Scheduler,
    SchedulerSettings,
)
from controller.scheduler.batch import match
from tests.controller.scheduler.support import fleet, record, request


def _snapshot(state: FleetState) -> tuple[object, ...]:
    return (
        state.used_vcpus.copy().tolist(),
        state.used_memory_mib.copy().tolist(),
        state.vms.copy().tolist(),
        {g: dict(state.group_hosts(g)) for g in ("web", "db")},
    )


def _group(n: int, group: str, policy: str, memory_mib: int = 1024, **kw: object) -> list[PlacementRequest]:
    return [
        PlacementRequest(vm=f"{group}-{i}", memory_mib=memory_mib, group=group, group_policy=policy, **kw)  # type: ignore[arg-type]
        for i in range(n)
    ]


def test_fifty_anti_affinity_members_land_on_fifty_distinct_hosts_and_planning_changes_nothing():
    """A 50-member anti-affinity batch gets 50 distinct hosts; the state is untouched until commit."""
    state = fleet(*(record(f"h{i:02d}") for i in range(60)))
    scheduler = Scheduler(state)
    requests = _group(50, "web", "anti-affinity")
    before = _snapshot(state)
    batch = scheduler.select_batch(requests)
    assert batch.ok and batch.unplaced == []
    assert len({d.host_id for d in batch.decisions}) == 50
    assert _snapshot(state) == before
    claims = scheduler.commit_batch(requests, batch)
    assert all(c is not None for c in claims) and len(state.group_hosts("web")) == 50


def test_matching_places_a_group_that_greedy_placement_corners():
    """Everyone prefers the busy host A; greedy gives it to x and strands z, the batch plan does not."""
    state = fleet(record("A"), record("B"), record("C"))
    state.claim(0, PlacementRequest(vm="other", memory_mib=2048))
    group = dict(group="web", group_policy="anti-affinity", memory_mib=1024)
    requests = [
        PlacementRequest(vm="x", hosts=("A", "B"), **group),  # type: ignore[arg-type]
        PlacementRequest(vm="y", hosts=("A", "C"), **group),  # type: ignore[arg-type]
        PlacementRequest(vm="z", hosts=("A", "C"), **group),  # type: ignore[arg-type]
    ]
    scheduler = Scheduler(state)
    greedy = []
    for r in requests:
        decision = scheduler.select(r)
        greedy.append(decision.host_id)
        if decision.ok:
            scheduler.claim(decision, r)
    assert greedy == ["A", "C", None], "the corner this test is about"
    for r in requests:
        state.release(r.vm)
    batch = scheduler.select_batch(requests)
    assert batch.ok
    placed = {d.vm: d.host_id for d in batch.decisions}
    assert placed["x"] == "B" and {placed["y"], placed["z"]} == {"A", "C"}


def test_matching_finds_a_perfect_assignment_when_one_exists():
    """The augmenting-path matcher assigns every member when Hall's condition holds."""
    candidates = [[0, 1], [0, 2], [0, 2], [3, 1, 0]]
    assignment = match(range(4), candidates)
    assert len(assignment) == 4 and len(set(assignment.values())) == 4
    assert all(assignment[j] in candidates[j] for j in assignment)
    assert len(match(range(3), [[0], [0], [0, 1]])) == 2


def test_affinity_group_goes_to_one_host_that_fits_all_of_it():
    """Three 4 GiB members go together to the one host with 12 GiB free, not to the emptier small ones."""
    state = fleet(
        record("s1", memory_mib=8192), record("s2", memory_mib=8192), record("big", memory_mib=16384)
    )
    batch = Scheduler(state).select_batch(_group(3, "db", "affinity", memory_mib=4096))
    assert batch.ok and {d.host_id for d in batch.decisions} == {"big"}


def test_affinity_group_that_fits_nowhere_fails_whole_and_says_why():
    """No host holds the whole affinity group: the batch fails and names the group."""
    state = fleet(record("s1", memory_mib=8192), record("s2", memory_mib=8192))
    batch = Scheduler(state).select_batch(_group(3, "db", "affinity", memory_mib=4096))
    assert not batch.ok and batch.unplaced == ["db-0", "db-1", "db-2"]
    assert "affinity group 'db' (3 vms together)" in batch.message and "2 hosts lack memory" in batch.message
    with pytest.raises(FleetStateError, match="failed"):
        Scheduler(state).commit_batch(_group(3, "db", "affinity", memory_mib=4096), batch)


def test_a_batch_that_cannot_all_fit_fails_atomically_unless_best_effort():
    """Five anti-affinity members on four hosts: nothing placed; best effort places four."""
    state = fleet(*(record(f"h{i}") for i in range(4)))
    scheduler = Scheduler(state)
    before = _snapshot(state)
    batch = scheduler.select_batch(_group(5, "web", "anti-affinity"))
    assert not batch.ok and len(batch.unplaced) == 5 and "so none is placed" in batch.message
    assert "anti-affinity group 'web' needs 5 distinct hosts" in batch.message
    refused = [d for d in batch.decisions if not d.ok]
    assert len(refused) == 1
    ex = refused[0].explanation
    assert sum(ex.rejected.values()) == ex.hosts - ex.candidates
    assert _snapshot(state) == before
    best_effort = scheduler.select_batch(_group(5, "web", "anti-affinity", best_effort=True))
    assert best_effort.ok and len(best_effort.unplaced) == 1 and "placed 4 of 5" in best_effort.message
    scheduler.commit_batch(_group(5, "web", "anti-affinity", best_effort=True), best_effort)
    assert len(state.group_hosts("web")) == 4


def test_the_largest_request_is_placed_first():
    """A small VM listed first does not take the only host the large one fits on."""
    state = fleet(record("big", memory_mib=16384), record("small", memory_mib=4096))
    requests = [request("small-vm", memory_mib=3072), request("large-vm", memory_mib=14000)]
    batch = Scheduler(state).select_batch(requests)
    assert batch.ok and [d.host_id for d in batch.decisions] == ["small", "big"]


def test_anti_affinity_batch_avoids_hosts_of_existing_members():
    """Members already running keep their hosts off-limits to new members of the group."""
    state = fleet(*(record(f"h{i}") for i in range(4)))
    state.claim(0, PlacementRequest(vm="web-old", group="web", group_policy="anti-affinity"))
    batch = Scheduler(state).select_batch(_group(3, "web", "anti-affinity"))
    assert batch.ok and "h0" not in {d.host_id for d in batch.decisions}


def test_soft_groups_in_a_batch_see_earlier_members():
    """Soft anti-affinity members of one batch spread across hosts."""
    state = fleet(*(record(f"h{i}", memory_mib=65536) for i in range(3)))
    batch = Scheduler(state).select_batch(_group(3, "web", "soft-anti-affinity"))
    assert batch.ok and len({d.host_id for d in batch.decisions}) == 3


def test_commit_refuses_requests_that_do_not_match_the_plan():
    """commit_batch checks it is given the planned requests."""
    state = fleet(record("h1"))
    scheduler = Scheduler(state, SchedulerSettings())
    batch = scheduler.select_batch([request("a")])
    with pytest.raises(FleetStateError, match="not the ones"):
        scheduler.commit_batch([request("b")], batch)
    assert int(np.count_nonzero(state.vms)) == 0
