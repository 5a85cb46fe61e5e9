"""Safe retries: a mutating request sent with an ``Idempotency-Key`` header is done at most once.

A script whose POST timed out cannot know whether the controller did it. Sent again with the same
key, the request gets the first answer (status and body, marked ``Idempotent-Replayed: true``) and
never starts a second operation, also when both copies arrive at once: the second waits for the
first to finish. The same key with another request (method, path, query or body) is a 409 that says
so. Keys belong to the caller (each token has its own), are 1 to 255 visible ASCII characters (a
UUID is a good key), and their answers are kept in the store for 24 h
(:mod:`controller.state.idempotency`; the store's retention task prunes older ones), so a retry
after a controller restart is safe too.

Answers are kept whatever their status, except 5xx, 408 and 429, which say "try again": a retry
with the same key then does the work. A 202 is kept as it was: the operation it names has moved on
since, and ``GET /api/v1/operations/{id}`` shows where it is.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from controller.api.http import error_response
from controller.state.idempotency import IdempotencyStore, StoredAnswer

HEADER = "Idempotency-Key"
_KEY = re.compile(r"[\x21-\x7e]{1,255}\Z")
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Statuses that invite a retry, so their answers are not kept.
_RETRYABLE = frozenset({408, 429})
#: The OpenAPI description of the header, on every mutating route.
PARAMETER = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "description": "Send the same key again to get the first answer instead of a second action (kept 24 h).",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
}


class Idempotency:
    """The middleware of the module docstring (runs after authentication, which names the caller)."""

    def __init__(self, store: IdempotencyStore) -> None:
        self.store = store
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def handle(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        key = request.headers.get(HEADER)
        if key is None or request.method not in _MUTATING:
            return await call_next(request)
        if not _KEY.match(key):
            return error_response(
                400,
                "bad_idempotency_key",
                f"the {HEADER} header must be 1 to 255 visible ASCII characters, without spaces "
                f"(got {len(key)} characters{'' if key.isascii() else ', not all ASCII'}); a UUID is a good key",
                {"header": HEADER},
            )
        caller = getattr(request.state, "caller", None)
        slot = (caller.name if caller is not None else "anonymous", key)
        body = await request.body()
        digest = hashlib.sha256(
            b"\0".join((request.method.encode(), request.url.path.encode(), request.url.query.encode(), body))
        ).hexdigest()
        while (first := self._inflight.get(slot)) is not None:
            await asyncio.shield(first)  # the first request with this key is still being answered
        stored = self.store.get(*slot)
        if stored is not None:
            return _replay(stored, digest, key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = done
        try:
            response = await call_next(request)
            content = b"".join([chunk async for chunk in response.body_iterator])  # type: ignore[attr-defined]
            status = response.status_code
            if status < 500 and status not in _RETRYABLE:
                media = response.headers.get("content-type", "application/json")
                self.store.put(*slot, StoredAnswer(digest, status, media, content, time.time()))
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            return Response(content=content, status_code=status, headers=headers)
        finally:
            del self._inflight[slot]
            done.set_result(None)


def _replay(stored: StoredAnswer, digest: str, key: str) -> Response:
    if stored.request_sha256 != digest:
        return error_response(
            409,
            "idempotency_key_reused",
            f"{HEADER} {key!r} was used {time.time() - stored.created_at:.0f}s ago for another request "
            "(another method, path, query or body); a new request needs a new key",
            {"header": HEADER},
        )
    return Response(
        content=stored.body,
        status_code=stored.status,
        media_type=stored.content_type,
        headers={"Idempotent-Replayed": "true"},
    )
