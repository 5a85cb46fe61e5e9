"""Each host's link budget for migration streams: grants never add up past the link.

A send asks for its policy's bandwidth. It gets it if both of its hosts have that much free, or what
is free if that is at least a quarter of what it asked; otherwise it waits for a send to end. On a
real link, overlapping streams would share it anyway and each would converge more slowly: the
waiting stream would send the same memory later, and the running one would re-send more of what
its guest dirtied meanwhile. So a host with a 1170 MiB/s link and policies of 1024 MiB/s sends one
stream at a time, at full speed; with policies of 200 MiB/s it sends five at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable

log = logging.getLogger(__name__)

#: The smallest part of what a send asks for that it accepts instead of waiting.
MIN_PART = 0.25


class LinkBudget:
    """MiB/s granted to sends under way on each host (as source or destination)."""

    def __init__(self, link_mib_s: float) -> None:
        self.link_mib_s = link_mib_s
        self.granted: defaultdict[str, float] = defaultdict(float)
        self._changed = asyncio.Condition()

    async def grant(
        self, source: str, target: str, wanted_mib_s: float, what: str, cancelled: Callable[[], bool]
    ) -> float | None:
        """The bandwidth a send from ``source`` to ``target`` may use, once there is room (taken from
        both budgets); None if ``cancelled()`` turned true while it waited.
        """
        want = min(wanted_mib_s, self.link_mib_s)
        told = False
        async with self._changed:
            while True:
                free = self.link_mib_s - max(self.granted[source], self.granted[target])
                if free >= want * MIN_PART:
                    grant = min(want, free)
                    self.take(source, target, grant)
                    return grant
                if cancelled():
                    return None
                if not told:
                    told = True
                    busy = source if self.granted[source] >= self.granted[target] else target
                    log.info(
                        "%s waits for %s's link: %.0f of %.0f MiB/s are granted to sends under way",
                        what, busy, self.granted[busy], self.link_mib_s,
                    )  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)

    def take(self, source: str, target: str, mib_s: float) -> None:
        """Count a grant made earlier (a send resumed after a restart re-uses its bandwidth)."""
        self.granted[source] += mib_s
        self.granted[target] += mib_s

    async def give_back(self, source: str, target: str, mib_s: float) -> None:
        """A send ended: its bandwidth is free again, and waiting sends look again."""
        async with self._changed:
            self.granted[source] -= mib_s
            self.granted[target] -= mib_s
            self._changed.notify_all()
