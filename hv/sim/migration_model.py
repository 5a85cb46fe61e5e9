"""Iterative pre-copy live migration as arithmetic: how long, how much downtime, does it converge.

Live migration (QEMU, Xen, libvirt alike) first copies all guest memory while the guest runs, then
copies again whatever the guest dirtied meanwhile, round after round, until the rest is small enough
to copy with the guest paused within the allowed downtime. A guest that dirties memory as fast as the
link carries it never gets there.

The sim engine, the migration orchestrator and the power planner all use :func:`precopy_estimate`, so
the sim's migrations and the planners' expectations agree; the real engines' estimates must match it.
It is a pure function of its arguments: no clock, no randomness.
"""

from __future__ import annotations

import math

import msgspec

__all__ = ["MigrationEstimate", "precopy_estimate"]


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


def _check_finite(field: str, value: float, *, minimum: float) -> None:
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{field} must be a finite number >= {minimum}, got {value}")
