"""The bus's incoming queue: admission as each message leaves the socket, then one lane per sender.

paho parses every PUBLISH on the event loop and hands it to aiomqtt's queue; the bus dispatches from
that queue. With one FIFO for everything, a sender that floods pushes every other sender's messages
behind its own, and a limit applied by the handler comes too late: the neighbours' messages are
already waiting. :class:`LaneQueue` (aiomqtt's ``queue_type``) changes two things:

- an :data:`Admission` callback sees each message (topic, payload, retain flag) as paho delivers it,
  before anything is queued. It returns the lane the message goes to, or None to drop it. The
  controller's intake rate-limits there, and notes heartbeats there, so no queue stands between a
  host and its liveness;
- messages wait in one bounded FIFO per lane, and the bus takes them round-robin across lanes, so
  one sender's backlog delays another's by at most one message per busy lane.

Drops (refused by the admission, a full lane, the whole queue full) are counted in
:class:`InboundCounters`, never raised: the socket reader must go on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

log = logging.getLogger(__name__)

#: Lanes kept at most; past it the empty ones are forgotten.
_MAX_LANES = 200_000

#: ``admit(topic, payload, retain) -> lane`` (None: drop). Called on the event loop, for every message.
Admission = Callable[[str, bytes, bool], "str | None"]


@dataclass(slots=True)
class InboundCounters:
    refused: int = 0
    lane_overflow: int = 0
    queue_overflow: int = 0
    admission_errors: int = 0
    #: The most messages queued at once (all lanes), since the bus started.
    peak: int = 0


def admit_all(topic: str, payload: bytes, retain: bool) -> str | None:
    """The default admission: every message, one lane."""
    return ""


class LaneQueue(asyncio.Queue[aiomqtt.Message]):
    """An ``asyncio.Queue`` of per-lane bounded FIFOs, taken round-robin (see the module docstring).

    ``maxsize`` from aiomqtt is ignored (put never blocks nor raises); the bounds are ``lane_max``
    per lane and ``total_max`` over all, and past either the message is dropped and counted.
    """

    def __init__(
        self,
        maxsize: int = 0,
        *,
        admission: Callable[[], Admission],
        counters: InboundCounters,
        lane_max: int,
        total_max: int,
    ) -> None:
        self._admission = admission
        self._counters = counters
        self._lane_max = lane_max
        self._total_max = total_max
        super().__init__(0)

    def _init(self, maxsize: int) -> None:
        #: Each lane's FIFO. A lane that empties is kept for its next message: making and dropping a
        #: deque per message (most lanes hold one at a time) fed the garbage collector measurably.
        self._lanes: dict[str, collections.deque[aiomqtt.Message]] = {}
        #: The lanes with messages, in the order they are served.
        self._turns: collections.deque[str] = collections.deque()
        self._size = 0

    def _qsize(self) -> int:
        return self._size

    def empty(self) -> bool:
        return self._size == 0

    def _put(self, item: aiomqtt.Message) -> None:
        counters = self._counters
        payload = item.payload if isinstance(item.payload, bytes) else _as_bytes(item.payload)
        try:
            lane = self._admission()(item.topic.value, payload, bool(item.retain))
        except Exception:
            counters.admission_errors += 1
            log.exception("admission of a message on %s failed; dropping it", item.topic.value)
            return
        if lane is None:
            counters.refused += 1
            return
        if self._size >= self._total_max:
            counters.queue_overflow += 1
            if counters.queue_overflow in (1, 1000) or counters.queue_overflow % 100_000 == 0:
                log.warning("incoming queue full (%d messages); dropping new ones", self._size)
            return
        queue = self._lanes.get(lane)
        if queue is None:
            if len(self._lanes) >= _MAX_LANES:
                self._forget_empty_lanes()
            queue = self._lanes[lane] = collections.deque()
        if not queue:
            self._turns.append(lane)
        elif len(queue) >= self._lane_max:
            queue.popleft()  # the newest says more than the oldest
            self._size -= 1
            counters.lane_overflow += 1
            if counters.lane_overflow in (1, 1000) or counters.lane_overflow % 100_000 == 0:
                log.warning("incoming lane %r full (%d messages); dropping its oldest", lane, len(queue))
        queue.append(item)
        self._size += 1
        counters.peak = max(counters.peak, self._size)

    def _get(self) -> aiomqtt.Message:
        lane = self._turns.popleft()
        queue = self._lanes[lane]
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._turns.append(lane)
        return item

    def _forget_empty_lanes(self) -> None:
        """Drop the kept empty lanes (only a broker without per-sender ACLs lets this many speak)."""
        self._lanes = {lane: queue for lane, queue in self._lanes.items() if queue}


def _as_bytes(payload: Any) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, str):
        return payload.encode()
    return bytes(payload)
