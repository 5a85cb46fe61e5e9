"""Per-host inbound rate limits, so one broken or hostile host cannot starve the others.

Every message from a host's subtree passes a token bucket for its (host, topic family) before it is
decoded. Past the bucket, messages are dropped cheaply: no decoding, one counter increment, and a log
line at most every few seconds per host. The limits sit far above what a healthy agent sends (one
telemetry sample a second, a handful of events per operation), so only floods meet them.

The limiter reads time through ``clock`` (``time.monotonic`` unless told otherwise), so a test can
drive refills with a fake clock instead of sleeping.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RateLimits:
    """(messages per second, burst) per topic family."""

    per_family: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "telemetry": (20.0, 50.0),
            "state": (5.0, 20.0),
            "inventory": (20.0, 100.0),
            "events": (500.0, 2000.0),
            "reply": (1000.0, 5000.0),
        }
    )
    log_every_s: float = 5.0


class InboundLimiter:
    def __init__(
        self, limits: RateLimits | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or RateLimits()
        self._clock = clock
        self.dropped: Counter[str] = Counter()
        self._buckets: dict[tuple[str, str], list[float]] = {}
        self._last_log: dict[str, float] = {}

    def allow(self, host_id: str, family: str, *, count_drop: bool = True) -> bool:
        """Take a token for one message; False (counted, unless ``count_drop`` is off) when over the rate."""
        rate, burst = self.limits.per_family.get(family, (1000.0, 5000.0))
        now = self._clock()
        bucket = self._buckets.get((host_id, family))
        if bucket is None:
            bucket = self._buckets[(host_id, family)] = [burst, now]
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        if not count_drop:
            return False
        self.dropped[host_id] += 1
        if now - self._last_log.get(host_id, -1e9) >= self.limits.log_every_s:
            self._last_log[host_id] = now
            log.warning(
                "host %s floods %s beyond %g msg/s; dropping (%d dropped from it so far)",
                host_id,
                family,
                rate,
                self.dropped[host_id],
            )
        return False
