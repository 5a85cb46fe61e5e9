"""MessagePack encoding and guarded decoding of bus messages.

Decoders are built once per topic family and reused (msgspec's advice). :class:`InboundDecoder`
never raises on bad input: it counts the reason (truncated, garbage, unknown kind, wrong type,
oversize, wrong sender), logs it with the topic it came from, and returns None, so a hostile or
broken peer can neither crash nor stall a receiver. Logging is rate-limited per reason so a flood
of junk does not become a flood of log lines.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Final, Literal

import msgspec

from protocols import messages, topics

log = logging.getLogger(__name__)

#: Largest payload a receiver accepts. An inventory of 1,000 VMs is about 150 KiB.
MAX_PAYLOAD_BYTES: Final = 1024 * 1024

BadReason = Literal[
    "oversize", "truncated", "garbage", "unknown_kind", "wrong_type", "wrong_sender", "bad_topic"
]

_TYPES: Final[dict[topics.Family, Any]] = {
    "state": messages.HostState,
    "inventory": messages.HostInventory,
    "telemetry": messages.HostTelemetry,
    "events": messages.Event,
    "cmd": messages.CmdMessage,
    "reply": messages.Reply,
}

_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """MessagePack bytes of a bus message."""
    return _encoder.encode(message)


class DecodeStats:
    """Counters of rejected input, by reason and by sending host."""

    def __init__(self) -> None:
        self.ok = 0
        self.by_reason: Counter[str] = Counter()
        self.by_host: Counter[str] = Counter()
        self._last_logged: dict[str, float] = {}

    @property
    def rejected(self) -> int:
        return sum(self.by_reason.values())

    def reject(self, reason: BadReason, topic: str, host_id: str, detail: str, log_every_s: float) -> None:
        self.by_reason[reason] += 1
        self.by_host[host_id] += 1
        now = time.monotonic()
        if now - self._last_logged.get(reason, -1e9) >= log_every_s:
            self._last_logged[reason] = now
            log.warning(
                "dropped a bad message on %s: %s (%s); %d dropped for this reason so far",
                topic,
                reason.replace("_", " "),
                detail,
                self.by_reason[reason],
            )


def classify(error: Exception) -> BadReason:
    """Map a msgspec error to the reason we count it under."""
    text = str(error)
    if isinstance(error, msgspec.ValidationError):
        if "`$.kind`" in text or "missing required field `kind`" in text:
            return "unknown_kind"
        return "wrong_type"
    if "truncated" in text:
        return "truncated"
    return "garbage"


class InboundDecoder:
    """Decode payloads by topic family, rejecting bad input without raising."""

    def __init__(
        self,
        max_bytes: int = MAX_PAYLOAD_BYTES,
        stats: DecodeStats | None = None,
        log_every_s: float = 5.0,
    ) -> None:
        self.max_bytes = max_bytes
        self.stats = stats or DecodeStats()
        self.log_every_s = log_every_s
        self._decoders = {family: msgspec.msgpack.Decoder(tp) for family, tp in _TYPES.items()}

    def decode(self, topic: str, payload: bytes) -> msgspec.Struct | None:
        """The message on ``topic``, or None (counted and logged) when it is not acceptable.

        A message is refused when its topic is not ours, it is too large, it does not decode into
        the type its topic family carries, or it names a different host than the topic it came
        on (one host must not speak for another).
        """
        parsed = topics.parse(topic)
        if parsed is None:
            self.stats.reject("bad_topic", topic, "?", "not a fv/v1 host topic", self.log_every_s)
            return None
        host_id, family = parsed
        if len(payload) > self.max_bytes:
            self.stats.reject(
                "oversize", topic, host_id, f"{len(payload)} bytes > cap {self.max_bytes}", self.log_every_s
            )
            return None
        try:
            message: msgspec.Struct = self._decoders[family].decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as exc:
            self.stats.reject(classify(exc), topic, host_id, str(exc), self.log_every_s)
            return None
        sender = getattr(message, "host_id", host_id)
        if sender != host_id:
            self.stats.reject(
                "wrong_sender", topic, host_id, f"message claims host {sender!r}", self.log_every_s
            )
            return None
        self.stats.ok += 1
        return message
