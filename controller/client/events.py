"""``client.events``: the fleet's event history, and the live stream that outlives a controller restart.

Events are numbered (``seq``). :meth:`Events.follow` reads the Server-Sent Events stream; when it
breaks (the controller restarts, the link drops) it connects again with ``Last-Event-ID`` set to
the last event it yielded, so the controller replays what was missed and nothing is yielded twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import msgspec

from controller.client.errors import Unreachable
from controller.client.transport import Transport
from protocols import rest

EventList = list[rest.Event]


class Events:
    """The event log of the fleet."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def list(self, since: int = 0, *, limit: int = 100) -> EventList:
        """Up to ``limit`` (at most 1000) events after ``since``, oldest first."""
        return await self._t.call("GET", "/events", EventList, params={"since": since, "limit": limit})

    async def history(self, since: int = 0) -> AsyncIterator[rest.Event]:
        """Every stored event after ``since``, oldest first, page after page."""
        while True:
            page = await self.list(since, limit=1000)
            for event in page:
                yield event
            if len(page) < 1000:
                return
            since = page[-1].seq

    async def follow(
        self,
        since: int | None = None,
        *,
        reconnect: bool = True,
        retry_s: float = 1.0,
        notice: Callable[[str], None] | None = None,
    ) -> AsyncIterator[rest.Event]:
        """Events as they happen; with ``since``, first every stored one after it.

        With ``reconnect`` a broken stream is opened again every ``retry_s`` seconds, resuming after
        the last event yielded; ``notice`` hears, in a sentence, when the controller is lost and when
        it answers again. Without ``reconnect`` the break raises ``Unreachable``.
        """
        last = since
        lost = False
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            try:
                async for event in self._stream(headers):
                    if event is None:  # the stream is open
                        if lost and notice is not None:
                            notice(f"the controller answers again; resuming after event #{last}")
                        lost = False
                        continue
                    if last is not None and event.seq <= last:
                        continue  # replayed and also queued live
                    last = event.seq
                    yield event
            except Unreachable as exc:
                if not reconnect:
                    raise
                if not lost and notice is not None:
                    notice(f"{exc}; retrying from event #{last if last is not None else 0}")
                lost = True
                await asyncio.sleep(retry_s)

    async def _stream(self, headers: dict[str, str]) -> AsyncIterator[rest.Event | None]:
        """Parsed frames of ``/events/stream``: None once it is open, then each event."""
        data: list[str] = []
        async for line in self._t.lines("/events/stream", headers=headers):
            if line.startswith(":"):
                if line.startswith(": connected"):
                    yield None
                continue
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                yield msgspec.json.decode("\n".join(data), type=rest.Event)
                data = []
        raise Unreachable("the controller closed the event stream", method="GET", path="/events/stream")
