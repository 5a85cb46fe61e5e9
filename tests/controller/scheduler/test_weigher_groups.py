"""SoftAffinityWeigher and SoftAntiAffinityWeigher: group preferences that never refuse a host."""

from __future__ import annotations

from controller.scheduler import PlacementRequest, Scheduler
from controller.scheduler.weighers import SoftAffinityWeigher, SoftAntiAffinityWeigher
from tests.controller.scheduler.support import assert_weigher_agrees, fleet, record, view


def _member(vm: str, policy: str) -> PlacementRequest:
    return PlacementRequest(vm=vm, memory_mib=1024, group="g", group_policy=policy)  # type: ignore[arg-type]


def test_raw_weights_count_members_on_the_host():
    """Soft affinity weighs members on the host; soft anti-affinity weighs minus that."""
    host = view(group_members={"g": 2}, group_sizes={"g": 3})
    assert SoftAffinityWeigher().weigh_host(host, _member("x", "soft-affinity")) == 2
    assert SoftAntiAffinityWeigher().weigh_host(host, _member("x", "soft-anti-affinity")) == -2
    assert not SoftAffinityWeigher().applies(_member("x", "affinity"))


def test_vector_forms_agree():
    """Weigh equals weigh_host on every host."""
    state = fleet(record("a"), record("b"), record("c"))
    state.claim(0, _member("m1", "soft-affinity"))
    state.claim(0, _member("m2", "soft-affinity"))
    state.claim(2, _member("m3", "soft-affinity"))
    assert_weigher_agrees(SoftAffinityWeigher(), state, _member("x", "soft-affinity"))
    assert_weigher_agrees(SoftAntiAffinityWeigher(), state, _member("x", "soft-anti-affinity"))


def test_soft_anti_affinity_spreads_until_it_cannot_then_shares():
    """Four soft-anti-affinity members on three hosts: three hosts, then a shared one, never a refusal."""
    state = fleet(record("a"), record("b"), record("c"))
    scheduler = Scheduler(state)
    hosts = []
    for i in range(4):
        req = _member(f"m{i}", "soft-anti-affinity")
        decision = scheduler.select(req)
        assert decision.ok
        scheduler.claim(decision, req)
        hosts.append(decision.host_id)
    assert len(set(hosts[:3])) == 3 and hosts[3] in hosts[:3]


def test_soft_affinity_follows_the_group_while_it_fits():
    """Soft-affinity members join the first member's host even though pack would open another."""
    state = fleet(record("a"), record("b"))
    state.claim(1, PlacementRequest(vm="other", memory_mib=4096))
    scheduler = Scheduler(state)
    first = _member("m0", "soft-affinity")
    scheduler.claim(scheduler.select(first), first)
    placed = scheduler.select(_member("m1", "soft-affinity"))
    assert placed.host_id == state.claims("m0")[0].host_id
