"""What the scheduler found out about one request: every filter's verdict and every weigher's score.

:meth:`Scheduler.evaluate <controller.scheduler.scheduler.Scheduler.evaluate>` builds an
:class:`Evaluation`; the scheduler turns it into a decision and the batch planner
(:mod:`controller.scheduler.batch`) reads it to match group members to hosts. It imports the filter
interface (:mod:`controller.scheduler.filters.base`), the fleet state's array types and the request,
never the scheduler or the batch planner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from controller.scheduler.filters.base import HostFilter
from controller.scheduler.fleet_state import BoolArray, FloatArray, IntArray
from controller.scheduler.request import PlacementRequest

__all__ = ["Evaluation", "Rejection", "sum_reasons"]

#: Up to this many top candidates, ranking uses repeated argmax instead of a partition.
_ARGMAX_TOP = 8


@dataclass(frozen=True, slots=True)
class Rejection:
    """Hosts one filter rejected for one reason."""

    reason: str
    count: int
    owner: HostFilter


@dataclass(slots=True)
class Evaluation:
    """Everything :meth:`Scheduler.evaluate` found out about one request (the batch planner reads it)."""

    request: PlacementRequest
    policy: str
    hosts: int
    filtered: dict[str, int]
    rejected: list[Rejection]
    #: Slots that passed every filter, and how many.
    alive: BoolArray
    count: int
    #: The passing slots in ascending order, and their total scores (same order).
    slots: IntArray
    score: FloatArray
    #: (weigher name, multiplier, normalised weights in ``slots`` order) of each weigher that told
    #: candidates apart.
    parts: list[tuple[str, float, FloatArray]]
    #: Slots alive just before the capacity filter (for "the most free memory on any host").
    before_capacity: BoolArray | None

    def rejected_counts(self) -> dict[str, int]:
        """Rejected hosts by reason code."""
        return sum_reasons(self.rejected)

    def ranked(self, limit: int) -> list[int]:
        """Up to ``limit`` candidate slots, best first (ties: lower slot first)."""
        return [int(self.slots[p]) for p in self.ranked_positions(limit)]

    def ranked_positions(self, limit: int) -> list[int]:
        """Like :meth:`ranked`, as positions in ``slots``."""
        k = min(limit, self.count)
        if k <= 0:
            return []
        if k <= _ARGMAX_TOP:
            # A few argmax passes beat a partition for the handful an explanation shows.
            score = self.score
            best = [int(score.argmax())]
            if k > 1:
                score = score.copy()
                for _ in range(k - 1):
                    score[best[-1]] = -np.inf
                    best.append(int(score.argmax()))
            positions = best
        else:
            top = np.argpartition(self.score, self.count - k)[self.count - k :]
            positions = sorted((int(p) for p in top), key=lambda p: (-self.score[p], p))
        return positions


def sum_reasons(rejections: Iterable[Rejection]) -> dict[str, int]:
    """Rejected hosts by reason code, over every filter."""
    out: dict[str, int] = {}
    for r in rejections:
        out[r.reason] = out.get(r.reason, 0) + r.count
    return out
