"""Per-host inbound rate limits, so one broken or hostile host cannot starve the others.

Every message from a host's subtree passes token buckets for its (host, topic family) before it is
queued, let alone decoded: one bucket in messages, and for the families that land in the store
(events) one in bytes too, so a host cannot fill the disk with few large messages either. Past the
buckets, messages are dropped cheaply: no decoding, a counter increment, and one summary log line
per host and family per interval (how many, how many bytes, the limits), never one per message. The
limits sit far above what a healthy agent sends (one telemetry sample a second, a handful of events
per operation), so only floods meet them.

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

_KIB = 1024.0


@dataclass(frozen=True, slots=True)
class RateLimits:
    """(per second, burst) per topic family: in messages, and in bytes where a family has a byte limit."""

    per_family: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "telemetry": (20.0, 50.0),
            "state": (5.0, 20.0),
            "inventory": (20.0, 100.0),
            "events": (500.0, 2000.0),
            "reply": (1000.0, 5000.0),
        }
    )
    bytes_per_family: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"events": (256 * _KIB, 1024 * _KIB)}
    )
    #: How often a host's drops are summed up in one log line.
    log_every_s: float = 5.0


@dataclass(slots=True)
class _Window:
    """Drops of one (host, family) since its summary window opened."""

    opened: float
    messages: int = 0
    nbytes: int = 0


class InboundLimiter:
    def __init__(
        self, limits: RateLimits | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or RateLimits()
        self._clock = clock
        #: Messages dropped, by host.
        self.dropped: Counter[str] = Counter()
        #: Bytes dropped, by host.
        self.dropped_bytes: Counter[str] = Counter()
        self._buckets: dict[tuple[str, str, bool], list[float]] = {}
        self._windows: dict[tuple[str, str], _Window] = {}

    def allow(self, host_id: str, family: str, size: int = 0, *, count_drop: bool = True) -> bool:
        """Take one message of ``size`` bytes from the host's buckets; False when over a limit (then
        counted and summed up in the next summary, unless ``count_drop`` is off).
        """
        now = self._clock()
        rate, burst = self.limits.per_family.get(family, (1000.0, 5000.0))
        messages = self._refill((host_id, family, False), rate, burst, now)
        byte_limit = self.limits.bytes_per_family.get(family)
        nbytes = None
        if byte_limit is not None:
            nbytes = self._refill((host_id, family, True), byte_limit[0], byte_limit[1], now)
        if messages[0] >= 1.0 and (nbytes is None or nbytes[0] >= size):
            messages[0] -= 1.0
            if nbytes is not None:
                nbytes[0] -= size
            return True
        if count_drop:
            self.dropped[host_id] += 1
            self.dropped_bytes[host_id] += size
            window = self._windows.get((host_id, family))
            if window is None:
                window = self._windows[(host_id, family)] = _Window(opened=now)
            window.messages += 1
            window.nbytes += size
            if now - window.opened >= self.limits.log_every_s:
                self.report()
        return False

    def _refill(self, key: tuple[str, str, bool], rate: float, burst: float, now: float) -> list[float]:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [burst, now]
        bucket[0] = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        return bucket

    def report(self) -> None:
        """Log one summary line per host and family whose window is over (call it now and then)."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            span = now - window.opened
            if span < self.limits.log_every_s:
                continue
            del self._windows[key]
            host_id, family = key
            rate, _ = self.limits.per_family.get(family, (1000.0, 5000.0))
            byte_limit = self.limits.bytes_per_family.get(family)
            limit = f"{rate:g} msg/s" + (f", {byte_limit[0] / _KIB:g} KiB/s" if byte_limit else "")
            log.warning(
                "host %s sent %s over its limit (%s): dropped %d messages (%.1f KiB) in the last %.1f s, "
                "%d in all; if this host is healthy, raise the limit, else look at what it runs",
                host_id, family, limit, window.messages, window.nbytes / _KIB, span, self.dropped[host_id],
            )  # fmt: skip
