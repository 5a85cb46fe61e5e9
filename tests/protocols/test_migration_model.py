"""protocols.migration: policy checks, the predict() escalation, the ConvergenceGuard, model properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.migration import (
    MIB,
    ConvergenceGuard,
    GuardAction,
    MigrationPolicy,
    MigrationSample,
    check_policy,
    precopy_estimate,
    predict,
)

BW = 1024.0  # MiB/s, the default policy's bandwidth


# ------------------------------------------------------------------------------------------------
# check_policy
# ------------------------------------------------------------------------------------------------


def test_the_default_policy_has_no_problems() -> None:
    """MigrationPolicy() passes check_policy."""
    assert check_policy(MigrationPolicy()) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_downtime_ms": 0, "downtime_ceiling_ms": 10}, "max_downtime_ms must be at least 1, got 0"),
        ({"max_downtime_ms": 500, "downtime_ceiling_ms": 100}, "downtime_ceiling_ms (100) must be >= "),
        ({"bandwidth_mib_s": 0.0}, "bandwidth_mib_s must be a positive number, got 0.0"),
        ({"bandwidth_mib_s": math.inf}, "bandwidth_mib_s must be a positive number, got inf"),
        ({"xbzrle": True, "xbzrle_cache_mib": 0}, "xbzrle_cache_mib must be at least 1"),
        ({"multifd": True, "multifd_channels": 65}, "multifd_channels must be 1..64, got 65"),
        ({"multifd": True, "xbzrle": True}, "xbzrle and multifd cannot be combined"),
        ({"stall_rounds": 0}, "stall_rounds must be at least 1, got 0"),
        ({"no_progress_s": -1.0}, "no_progress_s must be a positive number of seconds, got -1.0"),
    ],
)
def test_check_policy_names_exactly_the_problem(changes: dict[str, object], message: str) -> None:
    """Each bad setting gives one problem that names the setting, its value and what it must be."""
    problems = check_policy(MigrationPolicy(**changes))  # type: ignore[arg-type]
    assert len(problems) == 1, problems
    assert message in problems[0]


def test_check_policy_lists_every_problem() -> None:
    """Several bad settings give one sentence each."""
    problems = check_policy(MigrationPolicy(stall_rounds=0, no_progress_s=0.0, bandwidth_mib_s=-5.0))
    assert len(problems) == 3


def test_settings_that_do_not_apply_are_not_checked() -> None:
    """Xbzrle's cache and multifd's channels are checked only when the feature is on."""
    assert check_policy(MigrationPolicy(xbzrle_cache_mib=0, multifd_channels=0)) == []


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------


def test_predict_an_idle_vm_is_plain_precopy() -> None:
    """A VM that dirties nothing converges in one pre-copy round, and the summary says so."""
    p = predict(4096, 0.0, MigrationPolicy())
    assert (p.stage, p.converges, p.rounds, p.throttle_pct) == ("precopy", True, 1, 0)
    assert p.total_s == pytest.approx(4096 / BW)
    assert p.downtime_ms == 0.0
    assert p.summary.endswith("pre-copy converges in 1 round")


def test_predict_raises_the_downtime_when_that_is_enough() -> None:
    """A VM that only converges with more downtime than max_downtime_ms needs downtime_raised."""
    policy = MigrationPolicy()
    assert not precopy_estimate(1024, 1000.0, BW, policy.max_downtime_ms).converges
    p = predict(1024, 1000.0, policy)
    assert (p.stage, p.converges) == ("downtime_raised", True)
    assert policy.max_downtime_ms < p.downtime_ms <= policy.downtime_ceiling_ms
    assert "allowed downtime is raised to 977 ms (ceiling 2000 ms)" in p.summary


def test_predict_throttles_with_auto_converge() -> None:
    """A guest dirtying faster than the link converges with auto-converge at the smallest throttle that works."""
    p = predict(4096, 2000.0, MigrationPolicy(auto_converge=True))
    assert (p.stage, p.converges, p.throttle_pct) == ("throttling", True, 50)
    assert p.downtime_ms <= MigrationPolicy().downtime_ceiling_ms
    assert "throttled to about 50% (auto-converge)" in p.summary
    # 40% would not have been enough.
    assert not precopy_estimate(4096, 2000.0 * 0.6, BW, 2000).converges


def test_predict_reaches_the_full_throttle_of_99_percent() -> None:
    """auto-converge goes up to 99%, so a guest that only converges there is throttling, not aborting."""
    p = predict(4096, 15000.0, MigrationPolicy(auto_converge=True, postcopy=False))
    assert (p.stage, p.converges, p.throttle_pct) == ("throttling", True, 99)


def test_predict_switches_to_postcopy_when_allowed() -> None:
    """Without auto-converge a hot guest needs post-copy; the summary warns that it cannot be undone."""
    p = predict(4096, 2000.0, MigrationPolicy(auto_converge=False, postcopy=True))
    assert (p.stage, p.converges) == ("postcopy", True)
    assert p.total_s == pytest.approx(4096 / BW)
    assert p.downtime_ms <= MigrationPolicy().max_downtime_ms
    assert "post-copy cannot be rolled back" in p.summary


def test_predict_aborts_when_nothing_is_allowed() -> None:
    """Without auto-converge or post-copy a hot guest aborts, not converging; the summary says the fix."""
    p = predict(4096, 2000.0, MigrationPolicy(auto_converge=False, postcopy=False))
    assert (p.stage, p.converges) == ("aborting", False)
    assert "cannot converge under this policy" in p.summary
    assert "leave the VM on its source" in p.summary
    assert "allow postcopy" in p.summary


def test_predict_uses_the_slower_of_policy_and_link() -> None:
    """A link slower than the policy's bandwidth sets the pace; a faster one does not."""
    slow = predict(1024, 0.0, MigrationPolicy(), bandwidth_mib_s=100.0)
    fast = predict(1024, 0.0, MigrationPolicy(), bandwidth_mib_s=10_000.0)
    assert slow.total_s == pytest.approx(10.24)
    assert fast.total_s == pytest.approx(1024 / BW)


def test_predict_refuses_a_dead_link() -> None:
    """A link of 0 MiB/s is a ValueError, not silently the policy's bandwidth."""
    with pytest.raises(ValueError, match="bandwidth_mib_s must be positive"):
        predict(1024, 0.0, MigrationPolicy(), bandwidth_mib_s=0.0)


# ------------------------------------------------------------------------------------------------
# ConvergenceGuard
# ------------------------------------------------------------------------------------------------


def sample(
    iteration: int,
    remaining_mib: float,
    *,
    transferred_mib: float | None = None,
    dirty_mib_s: float = 100.0,
    bandwidth_mib_s: float = BW,
    throttle_pct: int = 0,
    status: str = "active",
) -> MigrationSample:
    moved = transferred_mib if transferred_mib is not None else 4096.0 * iteration
    return MigrationSample(
        status=status,  # type: ignore[arg-type]
        total_bytes=4096 * MIB,
        transferred_bytes=int(moved * MIB),
        remaining_bytes=int(remaining_mib * MIB),
        dirty_rate_bytes_s=dirty_mib_s * MIB,
        bandwidth_bytes_s=bandwidth_mib_s * MIB,
        iteration=iteration,
        throttle_pct=throttle_pct,
    )


def test_guard_leaves_a_converging_migration_alone() -> None:
    """Remaining bytes that halve every round never trigger an action."""
    guard = ConvergenceGuard(MigrationPolicy())
    actions = [guard.observe(sample(i, 4096 / 2**i), now=float(i)) for i in range(1, 10)]
    assert all(a == GuardAction() for a in actions)
    assert guard.stage == "precopy"


def test_one_slow_round_among_shrinking_ones_is_not_a_stall() -> None:
    """Only stall_rounds slow rounds in a row are a stall; a slow round between fast ones is not."""
    guard = ConvergenceGuard(MigrationPolicy(stall_rounds=2))
    remaining = [4000, 2000, 1900, 1000, 950, 500, 480, 250]
    actions = [guard.observe(sample(i, r), now=float(i)) for i, r in enumerate(remaining, start=1)]
    assert {a.kind for a in actions} == {"none"}
    assert guard.stage == "precopy"


def test_guard_acts_once_per_round() -> None:
    """Several samples within one round count as one round, so they never make a stall by themselves."""
    guard = ConvergenceGuard(MigrationPolicy(stall_rounds=2))
    actions = [guard.observe(sample(1, 2000, transferred_mib=100.0 * k), now=0.1 * k) for k in range(1, 30)]
    assert {a.kind for a in actions} == {"none"}


def stall(
    guard: ConvergenceGuard, rounds: range, *, throttle: int = 0, remaining: float = 2000.0
) -> list[GuardAction]:
    """Rounds whose remaining bytes do not shrink; returns the actions that are not "none"."""
    return [
        a
        for i in rounds
        if (a := guard.observe(sample(i, remaining, throttle_pct=throttle), now=float(i))).kind != "none"
    ]


def test_a_stall_raises_the_downtime_first_to_what_the_remainder_needs() -> None:
    """stall_rounds rounds that do not shrink by 10% give raise_downtime, sized for the remainder."""
    policy = MigrationPolicy(stall_rounds=3, auto_converge=False)
    guard = ConvergenceGuard(policy)
    assert stall(guard, range(1, 4)) == [], "three rounds make only two round-to-round comparisons"
    [action] = stall(guard, range(4, 5))
    # 1000 MiB at 1024 MiB/s with a 20% margin: 1172 ms (more than twice the 300 ms start).
    assert stall(ConvergenceGuard(policy), range(1, 5), remaining=1000.0)[0].downtime_ms == 1172
    assert action.kind == "raise_downtime"
    assert action.downtime_ms == policy.downtime_ceiling_ms  # 2000 MiB needs 2344 ms: capped
    assert guard.stage == "downtime_raised"
    assert "allowed downtime raised to 2000 ms" in action.reason


def test_the_raised_downtime_is_at_least_double_and_at_most_the_ceiling() -> None:
    """A tiny remainder still doubles the downtime; a huge one stops at the ceiling."""
    tiny = stall(ConvergenceGuard(MigrationPolicy()), range(1, 5), remaining=10.0)
    huge = stall(ConvergenceGuard(MigrationPolicy(downtime_ceiling_ms=900)), range(1, 5), remaining=4000.0)
    assert tiny[0].downtime_ms == 600
    assert huge[0].downtime_ms == 900


def test_after_raising_the_guard_waits_while_the_throttle_climbs_then_aborts() -> None:
    """With auto-converge the guard waits while the throttle rises; once it stops, it aborts naming rates."""
    policy = MigrationPolicy(stall_rounds=1, auto_converge=True, postcopy=False)
    guard = ConvergenceGuard(policy)
    assert [a.kind for a in stall(guard, range(1, 3))] == ["raise_downtime"]
    for i, throttle in zip(range(3, 9), (20, 30, 40, 50, 60, 70), strict=True):
        assert stall(guard, range(i, i + 1), throttle=throttle) == [], f"throttle {throttle}% still climbing"
        assert guard.stage == "throttling"
    assert stall(guard, range(9, 10), throttle=70) == [], "one flat round is not the end yet"
    [abort] = stall(guard, range(10, 11), throttle=70)
    assert abort.kind == "abort"
    assert guard.stage == "aborting"
    assert "dirtying 100 MiB/s against 1024 MiB/s" in abort.reason
    assert "vCPU throttle 70%" in abort.reason
    assert "post-copy is not allowed" in abort.reason


def test_after_the_full_throttle_the_guard_switches_to_postcopy_if_allowed() -> None:
    """At 99% throttle there is nothing left to wait for: post-copy, when the policy allows it."""
    guard = ConvergenceGuard(MigrationPolicy(stall_rounds=1, postcopy=True))
    assert [a.kind for a in stall(guard, range(1, 3))] == ["raise_downtime"]
    [action] = stall(guard, range(3, 4), throttle=99)
    assert action.kind == "postcopy"
    assert guard.stage == "postcopy"
    assert "vCPU throttle 99%" in action.reason


def test_without_auto_converge_the_second_stall_aborts() -> None:
    """No auto-converge and no post-copy: raise the downtime, then abort at the next stall."""
    guard = ConvergenceGuard(MigrationPolicy(stall_rounds=2, auto_converge=False))
    kinds = [a.kind for a in stall(guard, range(1, 8))]
    assert kinds[:2] == ["raise_downtime", "abort"]
    assert "vCPU throttle" not in stall(ConvergenceGuard(guard.policy), range(1, 8))[1].reason


def test_dirtying_as_fast_as_the_link_is_a_stall_from_round_two() -> None:
    """A dirty rate at or above the bandwidth escalates at round 2 without waiting for stall_rounds."""
    guard = ConvergenceGuard(MigrationPolicy(stall_rounds=10))
    assert guard.observe(sample(1, 4096, dirty_mib_s=2000), now=1.0).kind == "none"
    action = guard.observe(sample(2, 4096, dirty_mib_s=2000), now=2.0)
    assert action.kind == "raise_downtime"
    assert "dirtying 2000 MiB/s against 1024 MiB/s" in action.reason


def test_no_bytes_moved_for_no_progress_s_aborts_naming_the_link() -> None:
    """transferred_bytes frozen for no_progress_s aborts at once, whatever the round."""
    guard = ConvergenceGuard(MigrationPolicy(no_progress_s=5.0))
    frozen = sample(1, 3000, transferred_mib=1096.0)
    assert guard.observe(frozen, now=100.0).kind == "none"
    assert guard.observe(frozen, now=104.9).kind == "none"
    action = guard.observe(frozen, now=105.0)
    assert action.kind == "abort"
    assert "no data moved for 5.0s" in action.reason
    assert "link to the destination" in action.reason
    assert guard.stage == "aborting"


def test_moving_bytes_reset_the_no_progress_clock() -> None:
    """A slow link that still moves bytes is not aborted by the no-progress check."""
    guard = ConvergenceGuard(MigrationPolicy(no_progress_s=5.0))
    actions = [
        guard.observe(sample(1, 3000, transferred_mib=float(t)), now=float(t)) for t in range(0, 60, 4)
    ]
    assert {a.kind for a in actions} == {"none"}


@pytest.mark.parametrize("status", ["postcopy-active", "completed", "cancelled", "failed", "none"])
def test_guard_steers_nothing_outside_precopy(status: str) -> None:
    """Samples in post-copy or after the end never cause an action, even frozen for long."""
    guard = ConvergenceGuard(MigrationPolicy(no_progress_s=1.0, stall_rounds=1))
    actions = [
        guard.observe(sample(i, 4096, transferred_mib=1.0, dirty_mib_s=5000, status=status), now=10.0 * i)
        for i in range(1, 6)
    ]
    assert {a.kind for a in actions} == {"none"}


# ------------------------------------------------------------------------------------------------
# Properties of the model
# ------------------------------------------------------------------------------------------------

sizes = st.floats(min_value=1.0, max_value=1024.0 * 1024, allow_nan=False)
rates = st.floats(min_value=0.0, max_value=100_000.0, allow_nan=False)
links = st.floats(min_value=1.0, max_value=100_000.0, allow_nan=False)
downtimes = st.floats(min_value=1.0, max_value=60_000.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(memory=sizes, dirty=rates, bandwidth=links, downtime=downtimes)
def test_precopy_estimate_is_self_consistent(
    memory: float, dirty: float, bandwidth: float, downtime: float
) -> None:
    """For any inputs: total time is bytes over bandwidth, downtime fits the budget when it converges."""
    est = precopy_estimate(memory, dirty, bandwidth, downtime)
    assert est.total_s == pytest.approx(est.transferred_mib / bandwidth, rel=1e-9)
    assert est.transferred_mib >= memory
    assert 1 <= est.rounds <= 30
    assert math.isfinite(est.downtime_ms) and est.downtime_ms >= 0
    if est.converges:
        assert est.downtime_ms <= downtime * (1 + 1e-9)


@settings(max_examples=300, deadline=None)
@given(
    memory=sizes,
    dirty=rates,
    bandwidth=links,
    max_downtime=st.integers(min_value=1, max_value=5000),
    extra=st.integers(min_value=0, max_value=20_000),
    auto_converge=st.booleans(),
    postcopy=st.booleans(),
)
def test_predict_never_claims_an_aborting_migration_converges(
    memory: float,
    dirty: float,
    bandwidth: float,
    max_downtime: int,
    extra: int,
    auto_converge: bool,
    postcopy: bool,
) -> None:
    """predict() converges exactly when its stage is not aborting, and aborting only without post-copy."""
    policy = MigrationPolicy(
        max_downtime_ms=max_downtime,
        downtime_ceiling_ms=max_downtime + extra,
        bandwidth_mib_s=bandwidth,
        auto_converge=auto_converge,
        postcopy=postcopy,
    )
    p = predict(memory, dirty, policy)
    assert p.converges == (p.stage != "aborting")
    if postcopy:
        assert p.stage != "aborting"
    if p.stage == "precopy":
        assert p.downtime_ms <= max_downtime * (1 + 1e-9)
    if p.stage in ("downtime_raised", "throttling"):
        assert p.downtime_ms <= policy.downtime_ceiling_ms * (1 + 1e-9)
    if p.stage == "throttling":
        assert auto_converge and 20 <= p.throttle_pct <= 99
