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


class Gate:
    """The buckets of one host's topic family: tokens in messages, and in bytes where the family has
    a byte limit. Held by the intake per topic, so admitting a message costs no lookups.
    """

    __slots__ = (
        "burst",
        "byte_burst",
        "byte_rate",
        "byte_tokens",
        "family",
        "host_id",
        "rate",
        "stamp",
        "tokens",
    )

    def __init__(self, host_id: str, family: str, limits: RateLimits, now: float) -> None:
        self.host_id, self.family = host_id, family
        self.rate, self.burst = limits.per_family.get(family, _DEFAULT)
        self.tokens, self.stamp = self.burst, now
        self.byte_rate, self.byte_burst = limits.bytes_per_family.get(family, (0.0, -1.0))
        self.byte_tokens = self.byte_burst  # negative: no byte limit


#: (per second, burst) of a family the limits do not name.
_DEFAULT = (1000.0, 5000.0)


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
        self._gates: dict[tuple[str, str], Gate] = {}
        self._windows: dict[tuple[str, str], _Window] = {}

    def gate(self, host_id: str, family: str) -> Gate:
        """The buckets of ``host_id``'s ``family`` (made full on first use, with the limits then)."""
        gate = self._gates.get((host_id, family))
        if gate is None:
            gate = self._gates[(host_id, family)] = Gate(host_id, family, self.limits, self._clock())
        return gate

    def allow(self, host_id: str, family: str, size: int = 0, *, count_drop: bool = True) -> bool:
        """Take one message of ``size`` bytes from the host's buckets; False when over a limit (then
        counted and summed up in the next summary, unless ``count_drop`` is off).
        """
        return self.take(self.gate(host_id, family), size, count_drop=count_drop)

    def take(self, gate: Gate, size: int, *, count_drop: bool = True) -> bool:
        """:meth:`allow` for a gate already at hand (the intake's per-topic path)."""
        now = self._clock()
        elapsed = now - gate.stamp
        gate.stamp = now
        tokens = gate.tokens + elapsed * gate.rate
        gate.tokens = tokens = gate.burst if tokens > gate.burst else tokens
        if gate.byte_burst >= 0.0:
            byte_tokens = gate.byte_tokens + elapsed * gate.byte_rate
            gate.byte_tokens = byte_tokens = gate.byte_burst if byte_tokens > gate.byte_burst else byte_tokens
            if tokens >= 1.0 and byte_tokens >= size:
                gate.tokens -= 1.0
                gate.byte_tokens -= size
                return True
        elif tokens >= 1.0:
            gate.tokens -= 1.0
            return True
        if count_drop:
            self._count_drop(gate.host_id, gate.family, size, now)
        return False

    def _count_drop(self, host_id: str, family: str, size: int, now: float) -> None:
        self.dropped[host_id] += 1
        self.dropped_bytes[host_id] += size
        window = self._windows.get((host_id, family))
        if window is None:
            window = self._windows[(host_id, family)] = _Window(opened=now)
        window.messages += 1
        window.nbytes += size
        if now - window.opened >= self.limits.log_every_s:
            self.report()

    def report(self) -> None:
        """Log one summary line per host and family whose window is over (call it now and then)."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            span = now - window.opened
            if span < self.limits.log_every_s:
                continue
            del self._windows[key]
            host_id, family = key
            rate, _ = self.limits.per_family.get(family, _DEFAULT)
            byte_limit = self.limits.bytes_per_family.get(family)
            limit = f"{rate:g} msg/s" + (f", {byte_limit[0] / _KIB:g} KiB/s" if byte_limit else "")
            log.warning(
                "host %s sent %s over its limit (%s): dropped %d messages (%.1f KiB) in the last %.1f s, "
                "%d in all; if this host is healthy, raise the limit, else look at what it runs",
                host_id, family, limit, window.messages, window.nbytes / _KIB, span, self.dropped[host_id],
            )  # fmt: skip
