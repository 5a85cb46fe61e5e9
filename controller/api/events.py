"""Routes of ``/events``: the stored history, and the live Server-Sent Events stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from controller.api.http import MAX_SEQ, PREFIX, ApiError, json_response, responses
from controller.state.events import EventHub
from controller.state.store import EventRecord, Store


def router(store: Store, events: EventHub) -> APIRouter:
    """The event routes."""
    api = APIRouter()

    @api.get(f"{PREFIX}/events", summary="Past events, oldest first", responses=responses(200, "events"))
    async def list_events(
        since: int = Query(0, ge=0, le=MAX_SEQ, description="only events after this sequence number"),
        limit: int = Query(100, ge=1, le=1000),
    ) -> Response:
        return json_response(store.events_since(since, limit))

    @api.get(
        f"{PREFIX}/events/stream",
        summary="Live event stream (Server-Sent Events); resumes after Last-Event-ID",
        response_class=StreamingResponse,
    )
    async def stream_events(
        request: Request, since: int | None = Query(None, ge=0, le=MAX_SEQ)
    ) -> StreamingResponse:
        header = request.headers.get("last-event-id")
        start = since
        if start is None and header is not None:
            if not header.isdigit() or int(header) > MAX_SEQ:
                raise ApiError(
                    400, "invalid_request", f"Last-Event-ID {header!r} is not an event sequence number"
                )
            start = int(header)
        return StreamingResponse(
            _sse(store, events, request.is_disconnected, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return api


async def _sse(
    store: Store, events: EventHub, disconnected: Callable[[], Any], since: int | None
) -> AsyncIterator[bytes]:
    sub = events.subscribe()
    try:
        replayed = since
        while replayed is not None:  # every stored event after ``since``, a page at a time
            page = store.events_since(replayed, limit=1000)
            for event in page:
                yield _sse_frame(event)
            replayed = page[-1].seq if len(page) == 1000 else None
            since = page[-1].seq if page else since
        yield b": connected\n\n"
        while True:
            try:
                async with asyncio.timeout(15.0):  # not wait_for, which can swallow a cancel on 3.11
                    event = await sub.queue.get()
            except TimeoutError:
                if await disconnected():
                    return
                yield b": keep-alive\n\n"
                continue
            if since is not None and event.seq <= since:
                continue
            yield _sse_frame(event)
    finally:
        sub.close()


def _sse_frame(event: EventRecord) -> bytes:
    data = json.dumps(msgspec.to_builtins(event), separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.type}\ndata: {data}\n\n".encode()
