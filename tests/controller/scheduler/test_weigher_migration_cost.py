"""MigrationCostWeigher: prefer the target a running VM reaches fastest (same rack first)."""

from __future__ import annotations

import math

from controller.scheduler import MigrationSettings, Scheduler, SchedulerSettings
from controller.scheduler.weighers import MigrationCostWeigher, transfer_seconds
from tests.controller.scheduler.support import assert_weigher_agrees, fleet, record, request, view


def test_transfer_time_model():
    """Memory / (bandwidth - dirty), capped when the guest dirties as fast as the link."""
    assert transfer_seconds(1000, 100, 0, 30) == 10
    assert transfer_seconds(1000, 100, 50, 30) == 20
    assert transfer_seconds(1000, 100, 100, 30) == 300
    assert transfer_seconds(1000, 100, 99.99, 30) == 300
    assert math.isclose(transfer_seconds(1000, 100, 90, 30), 100)


def test_same_rack_targets_weigh_more():
    """A target in the source's rack has the faster link, so a higher (less negative) weight."""
    w = MigrationCostWeigher(
        MigrationSettings(same_rack_bandwidth_mib_s=1000, cross_rack_bandwidth_mib_s=100)
    )
    vm = request(memory_mib=2000, source_host="src", source_rack="r1", dirty_mib_s=50)
    assert w.weigh_host(view(labels={"rack": "r1"}), vm) == -2000 / 950
    assert w.weigh_host(view(labels={"rack": "r2"}), vm) == -2000 / 50
    assert not w.applies(request())


def test_scheduler_fills_in_the_source_rack_and_prefers_it():
    """A migration request without source_rack gets it from the fleet state and stays in the rack."""
    state = fleet(
        record("src"),
        record("far"),
        record("near"),
        labels={"src": {"rack": "r1"}, "far": {"rack": "r2"}, "near": {"rack": "r1"}},
    )
    assert_weigher_agrees(MigrationCostWeigher(), state, request(source_host="src", source_rack="r1"))
    assert_weigher_agrees(MigrationCostWeigher(), state, request(source_host="src"))
    scheduler = Scheduler(state, SchedulerSettings(default_policy="spread"))
    decision = scheduler.select(request(memory_mib=1024, source_host="src", dirty_mib_s=10))
    assert decision.host_id == "near"
    assert decision.explanation.filtered["host_affinity"] == 1
