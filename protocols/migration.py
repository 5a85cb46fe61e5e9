"""Live migration as a contract: the policy, the samples and progress, the model, the convergence guard.

Every layer needs the same answers about a migration, so they live here, at the bottom:
- the operator's :class:`MigrationPolicy` travels from the API through the controller to the source agent;
- engines report :class:`MigrationSample` (what QEMU's ``query-migrate`` says, or the sim's model);
- :func:`precopy_estimate` and :func:`predict` are the arithmetic that the sim engine, ``vm migrate
  --dry-run`` and the power planner all use, so their expectations agree with each other;
- :class:`ConvergenceGuard` is the stall detector the source agent runs against live samples.

**Pre-copy** copies all guest memory while the guest runs, then what the guest dirtied meanwhile, round
after round, until the rest fits in the allowed downtime. A guest that dirties memory as fast as the link
carries it never gets there. The guard measures that (dirty rate against bandwidth, remaining bytes
that stop shrinking, bytes that stop moving) rather than waiting out a fixed timeout, and escalates in
steps: raise the allowed downtime (up to ``downtime_ceiling_ms``), let auto-converge throttle the vCPUs
(armed at the start, because QEMU cannot change capabilities mid-migration), then switch to post-copy if
the policy allows it, else abort cleanly, which leaves the VM running on its source.

**Post-copy** resumes the guest on the destination at once and pulls the missing pages over the network
on demand. It always converges, but it cannot be rolled back: if the link or either host fails during
post-copy, neither side holds the whole guest and the VM is lost. It is off unless the policy allows it.

Everything here is pure: no clock, no I/O.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Literal

import msgspec

__all__ = [
    "ConvergenceGuard",
    "GuardAction",
    "MigrationEstimate",
    "MigrationPolicy",
    "MigrationPrediction",
    "MigrationResult",
    "MigrationSample",
    "check_policy",
    "precopy_estimate",
    "predict",
]

MIB = 1024 * 1024

#: QEMU's ``query-migrate`` status, as the engines report it.
MigrationStatus = Literal[
    "none", "setup", "active", "postcopy-active", "completed", "failed", "cancelling", "cancelled"
]
#: How far the guard has escalated.
MigrationStage = Literal["precopy", "downtime_raised", "throttling", "postcopy", "aborting"]


class MigrationPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one migration may behave. The defaults converge for most guests without risking the VM."""

    #: Allowed downtime at the start (QEMU ``downtime-limit``).
    max_downtime_ms: int = 300
    #: The guard may raise the allowed downtime up to this when the migration stalls.
    downtime_ceiling_ms: int = 2000
    #: Link bandwidth the migration may use. Always set explicitly: QEMU's own default is 128 MiB/s.
    bandwidth_mib_s: float = 1024.0
    #: Let QEMU throttle the guest's vCPUs when it dirties memory faster than the link carries it.
    auto_converge: bool = True
    #: Send deltas of recently sent pages (XBZRLE), with a cache of this size.
    xbzrle: bool = False
    xbzrle_cache_mib: int = 64
    #: Several TCP channels in parallel.
    multifd: bool = False
    multifd_channels: int = 2
    #: Allow switching to post-copy as the last step. It always converges but CANNOT be rolled back:
    #: a link or host failure during post-copy loses the VM.
    postcopy: bool = False
    #: Sync rounds in which the remaining bytes do not shrink by 10% before the guard escalates.
    stall_rounds: int = 3
    #: No byte moved for this long means the link is gone: abort (this is not a total time limit).
    no_progress_s: float = 10.0
    #: Copy local disks to the destination with a block mirror over NBD (else storage must be shared).
    copy_storage: bool = False


def check_policy(policy: MigrationPolicy) -> list[str]:
    """What is wrong with ``policy``, each as a sentence that says how to fix it (empty when fine)."""
    problems = []
    if policy.max_downtime_ms < 1:
        problems.append(f"max_downtime_ms must be at least 1, got {policy.max_downtime_ms}")
    if policy.downtime_ceiling_ms < policy.max_downtime_ms:
        problems.append(
            f"downtime_ceiling_ms ({policy.downtime_ceiling_ms}) must be >= max_downtime_ms "
            f"({policy.max_downtime_ms}); raise the ceiling or lower the start"
        )
    if not math.isfinite(policy.bandwidth_mib_s) or policy.bandwidth_mib_s <= 0:
        problems.append(f"bandwidth_mib_s must be a positive number, got {policy.bandwidth_mib_s}")
    if policy.xbzrle and policy.xbzrle_cache_mib < 1:
        problems.append(f"xbzrle_cache_mib must be at least 1 with xbzrle on, got {policy.xbzrle_cache_mib}")
    if policy.multifd and not 1 <= policy.multifd_channels <= 64:
        problems.append(f"multifd_channels must be 1..64, got {policy.multifd_channels}")
    if policy.multifd and policy.xbzrle:
        problems.append("xbzrle and multifd cannot be combined (QEMU refuses it); choose one")
    if policy.stall_rounds < 1:
        problems.append(f"stall_rounds must be at least 1, got {policy.stall_rounds}")
    if not math.isfinite(policy.no_progress_s) or policy.no_progress_s <= 0:
        problems.append(f"no_progress_s must be a positive number of seconds, got {policy.no_progress_s}")
    return problems


def policy_problems(subject: str, problems: list[str]) -> str:
    """The one wording of a refused migration policy: ``subject`` names what it was for."""
    return f"{subject}: the migration policy is invalid: " + "; ".join(problems)


# Bounds of what a host reports of a migration (decoded by the controller): finite, non-negative,
# and far above anything real, so a corrupt or hostile number is refused at decode.
_Bytes = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
_BytesPerS = Annotated[float, msgspec.Meta(ge=0.0, le=1e15)]
_Millis = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**31)]
_Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
_Text = Annotated[str, msgspec.Meta(max_length=4096)]


class MigrationSample(msgspec.Struct, frozen=True, kw_only=True):
    """One look at a running migration from its source (QEMU ``query-migrate``, or the sim model)."""

    status: MigrationStatus
    total_bytes: _Bytes = 0
    transferred_bytes: _Bytes = 0
    remaining_bytes: _Bytes = 0
    #: Guest memory dirtied per second, as QEMU measures it between syncs.
    dirty_rate_bytes_s: _BytesPerS = 0.0
    #: Measured throughput of the link.
    bandwidth_bytes_s: _BytesPerS = 0.0
    #: Dirty-sync rounds so far (``dirty-sync-count``).
    iteration: _Count = 0
    expected_downtime_ms: _Millis = 0.0
    #: vCPU throttle applied by auto-converge, in percent.
    throttle_pct: _Percent = 0
    #: Set once the migration has completed.
    downtime_ms: _Millis = 0.0
    total_ms: _Millis = 0.0
    error: _Text = ""


class MigrationResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a migration ended, carried in the source agent's reply."""

    status: MigrationStatus
    stage: MigrationStage
    total_ms: _Millis = 0.0
    downtime_ms: _Millis = 0.0
    transferred_bytes: _Bytes = 0
    iterations: _Count = 0
    reason: _Text = ""


class GuardAction(msgspec.Struct, frozen=True, kw_only=True):
    """What the source agent must do after a sample: nothing, raise the downtime, post-copy, abort."""

    kind: Literal["none", "raise_downtime", "postcopy", "abort"] = "none"
    downtime_ms: int = 0
    reason: str = ""


NOTHING = GuardAction()


class ConvergenceGuard:
    """The stall detector. Feed it samples in order; it answers with the next escalation step.

    A *stall* is ``policy.stall_rounds`` consecutive sync rounds whose remaining bytes did not shrink by
    10%, or a dirty rate at or above the measured bandwidth once round 2 has begun. The steps, in order:
    raise the allowed downtime to what the remainder needs (capped by the ceiling); wait for
    auto-converge's throttle while it still climbs (it may pause for up to ``stall_rounds`` rounds);
    post-copy if allowed; else abort. Independently, no byte moved for ``no_progress_s`` aborts at
    once: the link is gone, and waiting helps nothing.
    """

    #: QEMU's default ``max-cpu-throttle``.
    THROTTLE_MAX_PCT = 99

    def __init__(self, policy: MigrationPolicy) -> None:
        self.policy = policy
        self.stage: MigrationStage = "precopy"
        self.downtime_ms = policy.max_downtime_ms
        self._round = -1
        self._round_remaining: list[int] = []
        self._last_moved_at: float | None = None
        self._last_transferred = -1
        self._throttle_seen = 0
        self._throttle_rounds_flat = 0

    def observe(self, sample: MigrationSample, now: float) -> GuardAction:
        """The action ``sample``, seen at ``now`` (seconds, any monotonic origin), calls for."""
        if sample.status not in ("setup", "active"):
            return NOTHING  # post-copy, or ended: nothing left to steer
        if sample.transferred_bytes != self._last_transferred:
            self._last_transferred, self._last_moved_at = sample.transferred_bytes, now
        elif self._last_moved_at is not None and now - self._last_moved_at >= self.policy.no_progress_s:
            self.stage = "aborting"
            return GuardAction(
                kind="abort",
                reason=f"no data moved for {now - self._last_moved_at:.1f}s: the link to the destination "
                "is down or the destination stopped reading",
            )
        if sample.status != "active" or sample.iteration == self._round:
            return NOTHING
        self._round = sample.iteration
        self._round_remaining.append(sample.remaining_bytes)
        if not self._stalled(sample):
            return NOTHING
        self._round_remaining = self._round_remaining[-1:]
        return self._escalate(sample)

    def _stalled(self, sample: MigrationSample) -> bool:
        n = self.policy.stall_rounds
        history = self._round_remaining
        if sample.iteration >= 2 and 0 < sample.bandwidth_bytes_s <= sample.dirty_rate_bytes_s:
            return True
        if len(history) <= n:
            return False
        window = history[-(n + 1) :]
        return all(later > 0.9 * earlier for earlier, later in itertools.pairwise(window))

    def _escalate(self, sample: MigrationSample) -> GuardAction:
        p = self.policy
        bandwidth = sample.bandwidth_bytes_s or p.bandwidth_mib_s * MIB
        needed_ms = math.ceil(1000.0 * sample.remaining_bytes / bandwidth * 1.2)
        if self.downtime_ms < p.downtime_ceiling_ms and self.stage == "precopy":
            self.downtime_ms = min(p.downtime_ceiling_ms, max(needed_ms, 2 * self.downtime_ms))
            self.stage = "downtime_raised"
            return GuardAction(
                kind="raise_downtime",
                downtime_ms=self.downtime_ms,
                reason=f"not converging ({_rates(sample)}): allowed downtime raised to {self.downtime_ms} ms",
            )
        if p.auto_converge:
            climbing = sample.throttle_pct > self._throttle_seen
            self._throttle_seen = max(self._throttle_seen, sample.throttle_pct)
            self._throttle_rounds_flat = 0 if climbing else self._throttle_rounds_flat + 1
            if self._throttle_seen < self.THROTTLE_MAX_PCT and self._throttle_rounds_flat < max(
                2, p.stall_rounds
            ):
                self.stage = "throttling"
                return NOTHING
        tried = f"downtime {self.downtime_ms} ms" + (
            f", vCPU throttle {self._throttle_seen}%" if p.auto_converge else ""
        )
        if p.postcopy:
            self.stage = "postcopy"
            return GuardAction(
                kind="postcopy", reason=f"still not converging after {tried} ({_rates(sample)}): post-copy"
            )
        self.stage = "aborting"
        return GuardAction(
            kind="abort",
            reason=f"cannot converge ({_rates(sample)}) after {tried}; post-copy is not allowed by the "
            "policy. The VM keeps running on its source. Retry with a higher bandwidth or downtime, "
            "or allow post-copy",
        )


def _rates(sample: MigrationSample) -> str:
    return (
        f"dirtying {sample.dirty_rate_bytes_s / MIB:.0f} MiB/s against "
        f"{sample.bandwidth_bytes_s / MIB:.0f} MiB/s, {sample.remaining_bytes / MIB:.1f} MiB left"
    )


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class MigrationEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of a modelled pre-copy migration.

    ``rounds`` counts the live copy rounds (round 0 copies all memory); the final stop-and-copy with
    the guest paused is not a round. ``total_s`` and ``transferred_mib`` include that final copy, so
    ``total_s == transferred_mib / bandwidth``. When the migration does not converge, ``downtime_ms``
    is what forcing the final copy after the last round would cost.
    """

    converges: bool
    rounds: int
    total_s: float
    downtime_ms: float
    transferred_mib: float


def precopy_estimate(
    memory_mib: float,
    dirty_mib_s: float,
    bandwidth_mib_s: float,
    max_downtime_ms: float,
    max_rounds: int = 30,
) -> MigrationEstimate:
    """Model iterative pre-copy of a guest with ``memory_mib`` of RAM dirtying ``dirty_mib_s``.

    Round 0 sends all memory. Each later round sends what was dirtied during the round before it
    (``dirty_mib_s`` times that round's duration, at most ``memory_mib``). After each round, if what
    remains can be sent within ``max_downtime_ms`` the migration converges with that remainder as the
    stop-and-copy. It gives up (``converges=False``) after ``max_rounds`` rounds, or as soon as the
    remainder stops shrinking, because further rounds would only repeat themselves.

    Raises:
        ValueError: a negative size, rate or downtime, a bandwidth that is not positive, a non-finite
            number, or ``max_rounds`` below 1.
    """
    _check_finite("memory_mib", memory_mib, minimum=0.0)
    _check_finite("dirty_mib_s", dirty_mib_s, minimum=0.0)
    _check_finite("max_downtime_ms", max_downtime_ms, minimum=0.0)
    _check_finite("bandwidth_mib_s", bandwidth_mib_s, minimum=0.0)
    if bandwidth_mib_s <= 0:
        raise ValueError(
            f"bandwidth_mib_s must be positive, got {bandwidth_mib_s}; a migration needs a working link"
        )
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be at least 1, got {max_rounds}; round 0 copies all memory")

    downtime_budget_mib = bandwidth_mib_s * max_downtime_ms / 1000.0
    to_send = float(memory_mib)
    transferred = 0.0
    total_s = 0.0
    rounds = 0
    converges = False
    while True:
        round_s = to_send / bandwidth_mib_s
        transferred += to_send
        total_s += round_s
        rounds += 1
        dirtied = min(float(memory_mib), dirty_mib_s * round_s)
        if dirtied <= downtime_budget_mib:
            converges = True
            break
        if rounds >= max_rounds or dirtied >= to_send:
            break
        to_send = dirtied
    stop_copy_s = dirtied / bandwidth_mib_s
    return MigrationEstimate(
        converges=converges,
        rounds=rounds,
        total_s=total_s + stop_copy_s,
        downtime_ms=stop_copy_s * 1000.0,
        transferred_mib=transferred + dirtied,
    )


class MigrationPrediction(msgspec.Struct, frozen=True, kw_only=True):
    """What a migration under a policy is expected to do: the ``vm migrate --dry-run`` answer."""

    converges: bool
    #: The escalation the policy would need: precopy, downtime_raised, throttling, postcopy or aborting.
    stage: MigrationStage
    total_s: float
    downtime_ms: float
    rounds: int
    transferred_mib: float
    #: For ``throttling``: the vCPU throttle the model needs, in percent.
    throttle_pct: int = 0
    summary: str


def predict(
    memory_mib: float, dirty_mib_s: float, policy: MigrationPolicy, bandwidth_mib_s: float | None = None
) -> MigrationPrediction:
    """Walk the guard's escalation on the model: what would this migration take, and what would it need.

    ``bandwidth_mib_s`` is the link's real rate when it is slower than the policy's cap.

    Raises:
        ValueError: as :func:`precopy_estimate`.
    """
    bw = policy.bandwidth_mib_s if bandwidth_mib_s is None else min(policy.bandwidth_mib_s, bandwidth_mib_s)
    plain = precopy_estimate(memory_mib, dirty_mib_s, bw, policy.max_downtime_ms)
    head = f"{memory_mib:.0f} MiB dirtying {dirty_mib_s:.0f} MiB/s over {bw:.0f} MiB/s"
    if plain.converges:
        rounds = f"{plain.rounds} round{'s' if plain.rounds != 1 else ''}"
        return _prediction(plain, "precopy", 0, f"{head}: pre-copy converges in {rounds}")
    raised = precopy_estimate(memory_mib, dirty_mib_s, bw, policy.downtime_ceiling_ms)
    if raised.converges:
        return _prediction(
            raised,
            "downtime_raised",
            0,
            f"{head}: converges once the allowed downtime is raised to {raised.downtime_ms:.0f} ms "
            f"(ceiling {policy.downtime_ceiling_ms} ms)",
        )
    if policy.auto_converge:
        # QEMU's auto-converge starts at 20% and adds 10% per round that does not converge, up to its
        # maximum (99%, which a 10% step alone never reaches).
        for pct in (*range(20, ConvergenceGuard.THROTTLE_MAX_PCT, 10), ConvergenceGuard.THROTTLE_MAX_PCT):
            slowed = precopy_estimate(
                memory_mib, dirty_mib_s * (1 - pct / 100), bw, policy.downtime_ceiling_ms
            )
            if slowed.converges:
                return _prediction(
                    slowed,
                    "throttling",
                    pct,
                    f"{head}: converges with the guest's vCPUs throttled to about {pct}% "
                    f"(auto-converge), downtime {slowed.downtime_ms:.0f} ms",
                )
    if policy.postcopy:
        total = memory_mib / bw
        return MigrationPrediction(
            converges=True,
            stage="postcopy",
            total_s=total,
            downtime_ms=min(policy.max_downtime_ms, 50.0),
            rounds=1,
            transferred_mib=memory_mib,
            summary=f"{head}: pre-copy cannot converge; switches to post-copy, about {total:.1f}s "
            "(post-copy cannot be rolled back: a link failure then loses the VM)",
        )
    return _prediction(
        raised,
        "aborting",
        0,
        f"{head}: cannot converge under this policy; it would abort and leave the VM on its source. "
        "Raise bandwidth_mib_s or downtime_ceiling_ms, or allow postcopy",
        converges=False,
    )


def _prediction(
    est: MigrationEstimate, stage: MigrationStage, throttle: int, summary: str, converges: bool = True
) -> MigrationPrediction:
    return MigrationPrediction(
        converges=converges,
        stage=stage,
        total_s=est.total_s,
        downtime_ms=est.downtime_ms,
        rounds=est.rounds,
        transferred_mib=est.transferred_mib,
        throttle_pct=throttle,
        summary=summary,
    )


def _check_finite(field: str, value: float, *, minimum: float) -> None:
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{field} must be a finite number >= {minimum}, got {value}")
