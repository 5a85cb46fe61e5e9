"""GroupAffinityFilter and GroupAntiAffinityFilter: hard VM-to-VM placement rules."""

from __future__ import annotations

from controller.scheduler import PlacementRequest
from controller.scheduler.filters import GroupAffinityFilter, GroupAntiAffinityFilter
from tests.controller.scheduler.support import assert_filter_agrees, fleet, record, request, view


def _member(vm: str, policy: str = "anti-affinity") -> PlacementRequest:
    return PlacementRequest(vm=vm, group="web", group_policy=policy)  # type: ignore[arg-type]


def test_anti_affinity_refuses_hosts_that_run_a_member():
    """A host with a member of the group is refused; others pass."""
    f = GroupAntiAffinityFilter()
    req = _member("web-2")
    assert not f.host_passes(view(group_members={"web": 1}, group_sizes={"web": 1}), req)
    assert f.host_passes(view(group_members={"db": 1}, group_sizes={"web": 1, "db": 1}), req)
    assert not f.applies(request()) and not f.applies(_member("x", "soft-anti-affinity"))


def test_affinity_goes_where_the_group_is_and_anywhere_for_the_first_member():
    """The first member of an affinity group may go anywhere; later ones only where members run."""
    f = GroupAffinityFilter()
    req = _member("db-2", "affinity")
    assert f.host_passes(view(), req)
    assert f.host_passes(view(group_members={"web": 2}, group_sizes={"web": 2}), req)
    assert not f.host_passes(view(group_sizes={"web": 2}), req)


def test_masks_follow_claims_and_releases():
    """Claiming a member blocks its host for anti-affinity; releasing it frees the host again."""
    state = fleet(record("h1"), record("h2"), record("h3"))
    state.claim(1, _member("web-1"))
    for f, policy in ((GroupAntiAffinityFilter(), "anti-affinity"), (GroupAffinityFilter(), "affinity")):
        assert_filter_agrees(f, state, _member("new", policy))
    assert GroupAntiAffinityFilter().mask(state, _member("new"))[:3].tolist() == [True, False, True]
    assert GroupAffinityFilter().mask(state, _member("new", "affinity"))[:3].tolist() == [False, True, False]
    state.release("web-1")
    assert GroupAntiAffinityFilter().mask(state, _member("new"))[:3].all()
    assert GroupAffinityFilter().mask(state, _member("new", "affinity"))[:3].all()


def test_refusal_names_the_group():
    """Reasons name the group and its policy."""
    assert GroupAntiAffinityFilter().phrase("group_anti_affinity", 2, _member("x")) == (
        "2 hosts already run a member of group 'web' (anti-affinity)"
    )
    assert GroupAffinityFilter().phrase("group_affinity", 1, _member("x", "affinity")) == (
        "1 host does not run group 'web' (affinity)"
    )
