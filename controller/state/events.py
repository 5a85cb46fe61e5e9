"""The event stream: every fleet event is stored, then fanned out to live subscribers.

Subscribers (SSE clients, the CLI) get a bounded queue each. A subscriber that cannot keep up loses
its oldest events, and the loss is counted and announced to it, so one slow client never stalls the
controller; it can re-read what it missed from the store with ``Last-Event-ID``.

An event's message often quotes a host (a VM event's reason, an engine's error). The store keeps it
as sent; the log line escapes its control characters (:func:`protocols.text.printable`), so a
reason with a newline or an ANSI sequence cannot forge or colour log lines.
"""

from __future__ import annotations

import asyncio
import logging

from controller.state.store import EventRecord, Store
from protocols.text import printable

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self, hub: EventHub, maxsize: int) -> None:
        self.queue: asyncio.Queue[EventRecord] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0
        self._hub = hub

    def offer(self, event: EventRecord) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    def close(self) -> None:
        self._hub.unsubscribe(self)


class EventHub:
    def __init__(self, store: Store, subscriber_queue: int = 1000) -> None:
        self.store = store
        self.subscriber_queue = subscriber_queue
        self._subscribers: set[Subscription] = set()

    def emit(
        self, type_: str, message: str, *, host_id: str = "", vm: str = "", op_id: str = ""
    ) -> EventRecord:
        """Store an event and hand it to every live subscriber."""
        event = self.store.append_event(type_, message, host_id=host_id, vm=vm, op_id=op_id)
        log.info("event %s: %s", printable(type_), printable(message))
        for sub in self._subscribers:
            sub.offer(event)
        return event

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self.subscriber_queue)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
