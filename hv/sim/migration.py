"""The sim engine's live migrations: pre-copy rounds replayed from a small persisted record.

A sim migration is the model of :func:`protocols.migration.precopy_estimate` played out on the
driver's clock. Round 0 sends all guest memory at the effective bandwidth; each later round sends what
the guest dirtied during the round before; after each round, a remainder that fits in the allowed
downtime is sent as the stop-and-copy and the migration completes. A run with no stall therefore takes
exactly the time and downtime that ``precopy_estimate`` predicts.

On top of the model it plays what QEMU does and the model does not:

- auto-converge: after two rounds in a row that dirtied more than half of what they sent, the vCPUs
  are throttled to 20%, then 10% more after each round that is still that hot, up to 99%, and the
  dirty rate shrinks by the throttle;
- the allowed downtime can change mid-migration (``migrate_tune``);
- a switch to post-copy sends what is still dirty once, with the guest running on the destination;
- cancellation, and failure when the source VM is powered off under the migration.

Nothing runs in the background and nothing is stored but :class:`SavedMigration`: the start time,
the parameters and a log of what happened (tune, workload change, post-copy, cancel, failure), each with
its clock time. :class:`MigrationRun` replays that log up to "now" whenever someone looks, so a new
driver on the same state directory (an agent restart) reports the same progress, and samples are a
deterministic function of the clock. Replaying is incremental: a run keeps its state at the last round
boundary it has passed, and events are only ever appended at the current time.

Ordering rule, so that incremental replay and replay from scratch agree: an event at time ``t`` acts
after every round boundary at or before ``t``, and before the boundaries after it.
"""

from __future__ import annotations

import builtins
import math
from typing import Literal

import msgspec

from protocols.migration import MIB, MigrationPolicy, MigrationSample

__all__ = ["POSTCOPY_SWITCH_MS", "MigrationEvent", "MigrationRun", "SavedMigration"]

#: The guest's pause while the source hands over to post-copy (the device state and the dirty bitmap).
POSTCOPY_SWITCH_MS = 50.0
#: QEMU's auto-converge defaults: first throttle, step, ceiling (``cpu-throttle-initial``,
#: ``cpu-throttle-increment``, ``max-cpu-throttle``).
THROTTLE_INITIAL_PCT = 20
THROTTLE_STEP_PCT = 10
THROTTLE_MAX_PCT = 99

Phase = Literal["precopy", "stopcopy", "postcopy", "completed", "cancelled", "failed"]
EventKind = Literal["tune", "dirty", "postcopy", "cancel", "fail"]


class MigrationEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Something that changed a migration's course at clock time ``at``.

    ``value`` is the new downtime limit in ms (``tune``) or the new dirty rate in MiB/s (``dirty``).
    """

    at: float
    kind: EventKind
    value: float = 0.0
    reason: str = ""


class SavedMigration(msgspec.Struct, frozen=True, kw_only=True):
    """The persisted form of one outgoing migration: enough to replay it from the start."""

    uri: str
    started_at: float
    policy: MigrationPolicy
    memory_mib: float
    dirty_mib_s: float
    #: The effective bandwidth: the smaller of the policy's and the host's link.
    bandwidth_mib_s: float
    events: builtins.list[MigrationEvent] = []
    #: The source VM has been paused as handed over (done once, so a later resume sticks).
    handed_over: bool = False


class MigrationRun:
    """One migration's replayed state. Call :meth:`advance` with the clock's time, then read it."""

    def __init__(self, saved: SavedMigration) -> None:
        self.saved = saved
        self.memory = float(saved.memory_mib)
        self.bw = float(saved.bandwidth_mib_s)
        self.phase: Phase = "precopy"
        self.now = saved.started_at
        #: Index of the current live round (0 copies all memory); iteration = round + 1.
        self.round = 0
        self.round_start = saved.started_at
        #: MiB the current round sends.
        self.to_send = self.memory
        #: MiB sent by the finished rounds.
        self.sent_before = 0.0
        self.dirty = float(saved.dirty_mib_s)
        self.throttle = 0
        self.hot_rounds = 0
        self.downtime_limit_ms = float(saved.policy.max_downtime_ms)
        #: Dirtied so far in the current round, up to ``dirty_since`` (the dirty rate may change mid-round).
        self.dirtied = 0.0
        self.dirty_since = saved.started_at
        #: The final phase (stop-and-copy or post-copy): when it began, how much it sends, its end.
        self.final_start = 0.0
        self.final_mib = 0.0
        self.final_end = 0.0
        self.downtime_ms = 0.0
        #: When the guest left the source for good: pre-copy's completion, or the post-copy switch.
        self.handover_at: float | None = None
        self.ended_at: float | None = None
        self.error = ""
        #: What was still to send when the migration was cancelled or failed.
        self.stopped_remaining = 0.0
        #: (round, its start, sent_before) when rounds began to repeat themselves, else None.
        self._steady: tuple[int, float, float] | None = None
        self._next_event = 0

    @property
    def effective_dirty(self) -> float:
        """The guest's dirty rate under the current throttle, MiB/s."""
        return self.dirty * (1.0 - self.throttle / 100.0)

    @property
    def under_way(self) -> bool:
        """Still moving data: pre-copy, stop-and-copy or post-copy."""
        return self.phase in ("precopy", "stopcopy", "postcopy")

    def record(self, event: MigrationEvent) -> None:
        """Append ``event`` (at the current time) to the log and apply it."""
        self.advance(event.at)
        self.saved = msgspec.structs.replace(self.saved, events=[*self.saved.events, event])
        self.advance(event.at)

    def mark_handed_over(self) -> None:
        self.saved = msgspec.structs.replace(self.saved, handed_over=True)

    def advance(self, now: float) -> None:
        """Replay everything up to ``now`` (a time before the last replayed one changes nothing)."""
        events = self.saved.events
        while True:
            event = events[self._next_event] if self._next_event < len(events) else None
            if self.phase == "precopy" and self._steady is not None:
                limit = now if event is None else min(now, event.at)
                if self._skip_steady_rounds(limit):
                    continue
                boundary = self._steady_start(self.round + 1)
            elif self.phase == "precopy":
                boundary = self.round_start + self.to_send / self.bw
            elif self.phase in ("stopcopy", "postcopy"):
                boundary = self.final_end
            else:
                break
            if boundary <= now and (event is None or boundary <= event.at):
                self._end_round(boundary) if self.phase == "precopy" else self._complete(boundary)
            elif event is not None and event.at <= now:
                self._next_event += 1
                self._apply(event)
            else:
                break
        # Events of an ended migration are history; skip them so the log stays consistent.
        self._next_event = len(events) if not self.under_way else self._next_event
        self.now = max(self.now, now)

    # -- replay steps -----------------------------------------------------------------------------

    def _dirtied_until(self, at: float) -> float:
        return min(self.memory, self.dirtied + self.effective_dirty * (at - self.dirty_since))

    def _end_round(self, at: float) -> None:
        sent = self.to_send
        dirtied = self._dirtied_until(at)
        one_rate = self.dirty_since == self.round_start  # no workload change within this round
        self.sent_before += sent
        if dirtied <= self.bw * self.downtime_limit_ms / 1000.0:
            self.phase = "stopcopy"
            self.final_start, self.final_mib = at, dirtied
            self.final_end = at + dirtied / self.bw
            self.downtime_ms = dirtied / self.bw * 1000.0
            return
        # QEMU's auto-converge: a round is hot when it dirtied more than half of what it sent.
        self.hot_rounds = self.hot_rounds + 1 if dirtied > 0.5 * sent else 0
        throttle = self.throttle
        if self.saved.policy.auto_converge:
            if self.throttle == 0 and self.hot_rounds >= 2:
                self.throttle = THROTTLE_INITIAL_PCT
            elif self.throttle > 0 and self.hot_rounds > 0:
                self.throttle = min(THROTTLE_MAX_PCT, self.throttle + THROTTLE_STEP_PCT)
        if self._steady is not None:
            at = self._steady_start(self.round + 1)
            self.sent_before = self._steady[2] + (self.round + 1 - self._steady[0]) * sent
        self.round += 1
        self.round_start = at
        self.to_send = dirtied
        self.dirtied, self.dirty_since = 0.0, at
        can_throttle = self.saved.policy.auto_converge and self.throttle < THROTTLE_MAX_PCT
        repeats = one_rate and dirtied == sent and throttle == self.throttle and not can_throttle
        if self._steady is None and repeats:
            self._steady = (self.round, self.round_start, self.sent_before)

    def _steady_start(self, round_: int) -> float:
        first_round, first_start, _ = self._steady or (self.round, self.round_start, 0.0)
        return first_start + (round_ - first_round) * (self.to_send / self.bw)

    def _skip_steady_rounds(self, limit: float) -> bool:
        """Jump over every identical round that ends by ``limit``, in one step; False if none does.

        A guest that dirties all it can while nothing can change (no throttle left to add, no event)
        repeats the same round forever. Computing round starts from the round number, not by adding up
        durations, keeps the result the same however the replay is cut into ``advance`` calls.
        """
        assert self._steady is not None
        first_round, _, first_sent = self._steady
        round_s = self.to_send / self.bw
        last = first_round + math.floor((limit - self._steady_start(first_round)) / round_s) - 1
        while last > self.round and self._steady_start(last + 1) > limit:
            last -= 1  # float rounding in the division
        if last <= self.round:
            return False
        self.hot_rounds += last - self.round
        self.round = last
        self.round_start = self._steady_start(last)
        self.sent_before = first_sent + (last - first_round) * self.to_send
        self.dirtied, self.dirty_since = 0.0, self.round_start
        return True

    def _complete(self, at: float) -> None:
        self.sent_before += self.final_mib
        self.phase = "completed"
        self.ended_at = at
        if self.handover_at is None:
            self.handover_at = at

    def _apply(self, event: MigrationEvent) -> None:
        at = event.at
        self._steady = None  # whatever the event, rounds may differ from here on
        if event.kind == "tune":
            self.downtime_limit_ms = event.value
        elif event.kind == "dirty":
            if self.phase == "precopy":
                self.dirtied = self._dirtied_until(at)
                self.dirty_since = at
            self.dirty = event.value
        elif event.kind == "postcopy" and self.phase == "precopy":
            sent = (at - self.round_start) * self.bw
            pending = min(self.memory, (self.to_send - sent) + self._dirtied_until(at))
            self.sent_before += sent
            self.phase = "postcopy"
            self.handover_at = at
            self.final_start, self.final_mib = at, pending
            self.final_end = at + pending / self.bw
            self.downtime_ms = min(self.downtime_limit_ms, POSTCOPY_SWITCH_MS)
        elif event.kind == "cancel" and self.phase in ("precopy", "stopcopy"):
            self._stop(at, "cancelled", "")
        elif event.kind == "fail":
            self._stop(at, "failed", event.reason)

    def _stop(self, at: float, phase: Literal["cancelled", "failed"], error: str) -> None:
        self.stopped_remaining = self._remaining_at(at)
        self.sent_before += self._sent_in_phase(at)
        self.phase = phase
        self.ended_at = at
        self.error = error

    def _sent_in_phase(self, at: float) -> float:
        if self.phase == "precopy":
            return min(self.to_send, (at - self.round_start) * self.bw)
        if self.phase in ("stopcopy", "postcopy"):
            return min(self.final_mib, (at - self.final_start) * self.bw)
        return 0.0

    # -- reading ------------------------------------------------------------------------------------

    def sample(self) -> MigrationSample:
        """The migration as ``query-migrate`` would report it at the last :meth:`advance` time."""
        now = self.now
        total_bytes = _bytes(self.memory)
        bandwidth = self.bw * MIB
        if self.phase in ("completed", "cancelled", "failed"):
            ended = self.ended_at if self.ended_at is not None else now
            return MigrationSample(
                status=self.phase,
                total_bytes=total_bytes,
                transferred_bytes=_bytes(self.sent_before),
                remaining_bytes=_bytes(self.stopped_remaining),
                bandwidth_bytes_s=bandwidth,
                iteration=self.round + 1,
                throttle_pct=self.throttle,
                downtime_ms=self.downtime_ms if self.phase == "completed" else 0.0,
                total_ms=(ended - self.saved.started_at) * 1000.0,
                error=self.error,
            )
        remaining = self._remaining_at(now)
        status: Literal["setup", "active", "postcopy-active"] = "active"
        if self.phase == "postcopy":
            status = "postcopy-active"
        elif self.phase == "precopy" and now <= self.saved.started_at:
            status = "setup"
        return MigrationSample(
            status=status,
            total_bytes=total_bytes,
            transferred_bytes=_bytes(self.sent_before + self._sent_in_phase(now)),
            remaining_bytes=_bytes(remaining),
            dirty_rate_bytes_s=self.effective_dirty * MIB if self.phase == "precopy" else 0.0,
            bandwidth_bytes_s=bandwidth,
            iteration=self.round + 1,
            expected_downtime_ms=remaining / self.bw * 1000.0,
            throttle_pct=self.throttle,
        )

    def _remaining_at(self, at: float) -> float:
        if self.phase == "precopy":
            return max(0.0, self.to_send - self._sent_in_phase(at))
        if self.phase in ("stopcopy", "postcopy"):
            return max(0.0, self.final_mib - self._sent_in_phase(at))
        return 0.0


def _bytes(mib: float) -> int:
    return round(mib * MIB)
