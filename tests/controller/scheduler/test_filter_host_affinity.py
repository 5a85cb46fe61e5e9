"""HostAffinityFilter: pin to a set of hosts, avoid hosts, and never the migration source."""

from __future__ import annotations

from controller.scheduler.filters import HostAffinityFilter
from tests.controller.scheduler.support import assert_filter_agrees, fleet, record, request, view


def test_allow_and_deny_lists():
    """Only listed hosts pass an allow list; avoided hosts never pass."""
    f = HostAffinityFilter()
    assert f.host_passes(view("h1"), request(hosts=("h1", "h2")))
    assert f.reason(view("h3"), request(hosts=("h1", "h2"))) == "not_requested"
    assert f.reason(view("h1"), request(avoid_hosts=("h1",))) == "avoided"
    assert not f.applies(request())


def test_a_migration_never_targets_its_source():
    """The host a VM runs on is not a target for moving it."""
    assert HostAffinityFilter().reason(view("src"), request(source_host="src")) == "source_host"


def test_mask_agrees_including_unknown_host_ids():
    """Lists naming hosts the fleet does not know agree between mask and host_passes."""
    state = fleet(record("h1"), record("h2"), record("h3"))
    for req in (
        request(hosts=("h1", "ghost")),
        request(avoid_hosts=("h2", "ghost")),
        request(hosts=("h1", "h2"), avoid_hosts=("h2",), source_host="h1"),
        request(source_host="h3"),
        request(hosts=("ghost",)),
    ):
        assert_filter_agrees(HostAffinityFilter(), state, req)
