"""Scheduler.select: filters, weighers, policies, and decisions that explain themselves."""

from __future__ import annotations

import msgspec
import pytest

from controller.scheduler import (
    PlacementRequest,
    Scheduler,
    SchedulerSettings,
    UnknownPolicyError,
)
from controller.state.store import Usage
from tests.controller.scheduler.support import fleet, record, request


def test_explanation_counts_each_filter_and_scores_the_top_candidates():
    """Per-filter removals in order, reasons that sum to the rejected hosts, and scored top hosts."""
    state = fleet(
        record("a1", memory_mib=65536),
        record("a2", memory_mib=32768),
        record("a3", memory_mib=16384),
        record("b1"),
        record("arm", arch="aarch64"),
        record("down", online=False),
        labels={"a1": {"zone": "a"}, "a2": {"zone": "a"}, "a3": {"zone": "a"}, "b1": {"zone": "b"}},
    )
    state.claim(2, PlacementRequest(vm="x", memory_mib=15000))
    decision = Scheduler(state, SchedulerSettings(default_policy="spread")).select(
        request("web-1", memory_mib=4096, require_labels={"zone": "a"})
    )
    ex = decision.explanation
    assert decision.host_id == "a1" and decision.ok
    assert ex.filtered == {"host_state": 1, "arch": 1, "labels": 1, "capacity": 1}
    assert ex.rejected == {"offline": 1, "arch": 1, "labels": 1, "memory": 1}
    assert sum(ex.rejected.values()) == ex.hosts - ex.candidates == 4
    assert [c.host_id for c in ex.top] == ["a1", "a2"]
    assert ex.top[0].score > ex.top[1].score and set(ex.top[0].weights) <= {
        "free_memory",
        "free_cpu",
        "balance",
    }
    assert msgspec.json.decode(msgspec.json.encode(decision), type=type(decision)) == decision


def test_refusal_message_counts_reasons_and_names_the_vm():
    """No valid host: 'no host can take vm ... : 2 hosts lack memory; 1 offline; 1 in maintenance'."""
    state = fleet(
        record("full-1", memory_mib=2048),
        record("full-2", memory_mib=2048),
        record("down", online=False),
        record("maint", maintenance=True),
        record("arm", arch="aarch64"),
        record("old", cpu_features=[]),
    )
    state.set_powered_on("old", False)
    refused = Scheduler(state).select(request("web-1", memory_mib=8192))
    assert not refused.ok and refused.refusal is not None and refused.host_index == -1
    text = refused.refusal.message
    assert text.startswith("no host can take vm 'web-1' (1 vCPU, 8.0 GiB RAM): 2 hosts lack memory")
    for part in ("1 offline", "1 in maintenance", "1 host cannot run x86_64 guests", "1 powered off"):
        assert part in text
    assert text.endswith(
        "the most free memory on any host is 1.5 GiB. To fix: ask for less memory, free some (stop or move "
        "VMs), or add a host"
    )
    assert refused.refusal.rejected == {
        "powered_off": 1,
        "offline": 1,
        "maintenance": 1,
        "arch": 1,
        "memory": 2,
    }


def test_each_refusal_names_the_filter_that_removed_the_last_candidates_its_numbers_and_its_fix():
    """The numbers and the fix follow the filter that emptied the list, not a fixed 'try a smaller VM'."""
    state = fleet(
        record("h1", memory_mib=65536, cores=4),
        record("h2", memory_mib=65536, cores=4),
        record("h3", maintenance=True),
        labels={"h1": {"zone": "a"}, "h2": {"zone": "a"}},
    )
    scheduler = Scheduler(state)

    def refused(**asked: object) -> str:
        decision = scheduler.select(request("web-1", **asked))  # type: ignore[arg-type]
        assert not decision.ok and decision.refusal is not None
        return decision.refusal.message

    vcpus = refused(vcpus=64)
    assert "lack vCPUs" in vcpus and "the most free vCPUs on any host is" in vcpus, vcpus
    assert "memory" not in vcpus.split(":", 1)[1].split("To fix")[0], "a vCPU refusal quotes no memory"
    assert vcpus.endswith("To fix: ask for fewer vCPUs, free some (stop or move VMs), or add a host"), vcpus
    labels = refused(require_labels={"zone": "b"})
    assert "2 hosts lack label zone=b" in labels and "`fleetvisor host label HOST zone=b`" in labels, labels
    assert "most free" not in labels
    unknown = refused(hosts=("host-9",))
    assert "'host-9' is not known" in unknown and "h1, h2, h3" in unknown and "check --host" in unknown, (
        unknown
    )
    assert "not in its host list" not in unknown
    only_maint = refused(hosts=("h3",))
    assert "host maintenance HOST off" in only_maint, only_maint


def test_an_empty_fleet_says_to_start_an_agent():
    """With no hosts the refusal says how to add one."""
    refused = Scheduler(fleet()).select(request())
    assert refused.refusal is not None and "fleetvisor agent" in refused.refusal.message


def test_hosts_that_left_are_neither_candidates_nor_counted():
    """A removed host is not chosen and does not appear in any count."""
    state = fleet(record("gone", memory_mib=65536), record("here"))
    state.remove_host("gone")
    decision = Scheduler(state).select(request())
    assert (
        decision.host_id == "here" and decision.explanation.hosts == 1 and decision.explanation.rejected == {}
    )


def test_static_cache_follows_state_changes():
    """Maintenance, labels and new hosts take effect at once although static masks are cached."""
    state = fleet(record("h1"), record("h2"), labels={"h1": {"zone": "a"}})
    scheduler = Scheduler(state, SchedulerSettings(default_policy="spread"))
    req = request(require_labels={"zone": "a"})
    assert scheduler.select(req).host_id == "h1"
    state.set_maintenance("h1", True)
    assert scheduler.select(req).refusal is not None
    state.set_labels("h2", {"zone": "a"})
    assert scheduler.select(req).host_id == "h2"
    state.upsert_host(record("h3", memory_mib=65536), {"zone": "a"})
    assert scheduler.select(req).host_id == "h3"


def test_select_is_pure_and_claim_applies_it():
    """Select changes nothing; claim holds the resources so the next select sees them."""
    state = fleet(record("h1", memory_mib=4096 + 512))
    scheduler = Scheduler(state)
    req = request("a", memory_mib=4096)
    first, again = scheduler.select(req), scheduler.select(req)
    assert first == again
    scheduler.claim(first, req)
    assert scheduler.select(request("b", memory_mib=1)).refusal is not None


def test_unknown_policy_is_an_error_naming_the_known_ones():
    """A request naming no known policy is refused before any work."""
    with pytest.raises(UnknownPolicyError, match="pack, power-saving, spread"):
        Scheduler(fleet(record("h1"))).select(request(policy="fastest"))


def test_policies_differ_as_named():
    """Pack fills the host in use, spread picks the emptiest, best-fit the tightest empty host."""
    state = fleet(
        record("used", memory_mib=32768), record("small", memory_mib=8192), record("big", memory_mib=65536)
    )
    state.set_usage("used", Usage(vcpus=2, memory_mib=8192, vms=1))
    scheduler = Scheduler(state)
    assert scheduler.select(request(memory_mib=1024, policy="pack")).host_id == "used"
    assert scheduler.select(request(memory_mib=1024, policy="spread")).host_id == "big"
    assert scheduler.select(request(memory_mib=1024, policy="best-fit")).host_id == "small"


def test_reasons_sum_to_rejected_hosts_when_several_filters_reject():
    """Each rejected host is counted once, under the first filter that rejected it."""
    state = fleet(
        *(
            record(f"h{i}", memory_mib=2048 if i % 2 else 16384, arch="aarch64" if i % 3 == 0 else "x86_64")
            for i in range(12)
        )
    )
    decision = Scheduler(state).select(request(memory_mib=4096, hosts=tuple(f"h{i}" for i in range(8))))
    ex = decision.explanation
    assert sum(ex.rejected.values()) == sum(ex.filtered.values()) == ex.hosts - ex.candidates


def test_select_and_claim_claims_only_when_placed():
    """select_and_claim holds the host it chose and holds nothing on a refusal."""
    state = fleet(record("h1", memory_mib=2048))
    scheduler = Scheduler(state)
    assert scheduler.select_and_claim(request("a", memory_mib=1024)).ok and state.claims("a")
    assert not scheduler.select_and_claim(request("b", memory_mib=4096)).ok and not state.claims("b")


def test_state_and_scheduler_must_agree_on_capacity_settings():
    """A scheduler over a state built with other capacity settings is refused at once."""
    from controller.scheduler import CapacitySettings

    with pytest.raises(ValueError, match="capacity settings"):
        Scheduler(fleet(record("h1")), SchedulerSettings(capacity=CapacitySettings(cpu_allocation_ratio=1.0)))
