"""One HTTP exchange with ``/api/v1``: encode, send, retry when that is safe, decode, or raise ``ApiError``.

Every resource of the client calls :meth:`Transport.call`. It sends a body as JSON (a msgspec Struct
of :mod:`protocols.rest` or a plain mapping), decodes the answer into the type the caller names, and
turns every failure into an :class:`~controller.client.errors.ApiError` (the controller's message, or
one of ours for a failure of the transport).

Retries: a request that never reached the controller (connection refused, a reset before the
answer) is sent again after 0.25 s, then 0.5 s... up to ``retries`` times. A mutating request
(POST, PUT, PATCH, DELETE) carries an ``Idempotency-Key`` made for it, the same on every try, so
the controller does it at most once however often it is sent (docs/api.md, "Safe retries"). A
request that got no answer within its timeout is not retried: it raises ``NoAnswer``, which says
the controller may have acted on it.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

# httpx imports its own command-line tool when it is imported (rich, click and pygments, where they
# are installed: about 50 ms of every `fleetvisor vm list`, which never runs it). A None in
# sys.modules makes that one import fail, and httpx then stands in a `main` that says how to get it.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

import httpx
import msgspec

from controller.client.errors import BY_STATUS, ApiError, NoAnswer, Unreachable
from protocols.rest import ErrorBody

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8080"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Answers that say "not now, try again": a retry with the same key is safe.
_TRY_AGAIN = frozenset({502, 503, 504})
#: A stream is quiet for at most the controller's keep-alive interval (15 s); allow for a slow link.
_STREAM_READ_S = 45.0


class Transport:
    """The HTTP side of the client: a connection pool to one controller, and its retry policy."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        verbose: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: ssl.SSLContext | bool = True
        if ca_file:
            verify = ssl.create_default_context(cafile=ca_file)
        elif not self.url.startswith("https://"):
            # Plain HTTP checks no certificate, so none is loaded (the default bundle costs ~40 ms of
            # every command); the context refuses any TLS peer, should one ever be reached.
            verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        hooks: dict[str, list[Any]] = (
            {"request": [_show_request], "response": [_show_response]} if verbose else {}
        )
        self._http = httpx.AsyncClient(
            base_url=f"{self.url}/api/v1", timeout=timeout, headers=headers, verify=verify, event_hooks=hooks
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def call(
        self,
        method: str,
        path: str,
        type_: type[T],
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> T:
        """Send ``method path`` and decode its answer as ``type_`` (``None`` for a 204).

        ``params`` with ``wait`` lengthens the timeout by that much: the controller holds the answer
        up to ``wait`` seconds. Raises ``ApiError`` (a subclass by status), ``Unreachable`` or ``NoAnswer``.
        """
        query = {k: _query_value(v) for k, v in (params or {}).items() if v is not None}
        wait = float(query.get("wait", 0) or 0)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if method in _MUTATING:
            headers[IDEMPOTENCY_HEADER] = idempotency_key or str(uuid.uuid4())
        content = msgspec.json.encode(body) if body is not None else None
        request_timeout = (timeout if timeout is not None else self.timeout) + wait
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(
                    method, path, params=query, content=content, headers=headers, timeout=request_timeout
                )
            except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
                raise self._no_answer(method, path, exc) from None
            except httpx.TransportError as exc:  # refused, reset, or no connection in time: not done
                if attempt < self.retries:
                    await asyncio.sleep(0.25 * 2**attempt)
                    continue
                raise self._unreachable(method, path, exc) from None
            if response.status_code in _TRY_AGAIN and attempt < self.retries:
                await asyncio.sleep(0.25 * 2**attempt)
                continue
            return _decode(response, type_, method, path)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def lines(
        self, path: str, *, params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[str]:
        """The lines of a streamed answer (Server-Sent Events), as they come.

        Raises ``ApiError`` for an error answer and ``Unreachable`` when the stream cannot start or breaks.
        """
        timeout = httpx.Timeout(self.timeout, read=_STREAM_READ_S)
        try:
            async with self._http.stream(
                "GET", path, params=dict(params or {}), headers=dict(headers or {}), timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _decode(response, type(None), "GET", path)
                async for line in response.aiter_lines():
                    yield line
        except httpx.TransportError as exc:
            raise self._unreachable("GET", path, exc) from None

    def _unreachable(self, method: str, path: str, exc: Exception) -> Unreachable:
        return Unreachable(
            f"cannot reach the controller at {self.url} ({exc or type(exc).__name__}); start it with "
            "`fleetvisor controller` or `fleetvisor demo`, or point --url / FLEETVISOR_URL at it",
            method=method,
            path=path,
        )

    def _no_answer(self, method: str, path: str, exc: Exception) -> NoAnswer:
        return NoAnswer(
            f"the controller at {self.url} accepted {method} {path} but did not answer in time; it is "
            "reachable, and the operation may still be running: see `fleetvisor op list` or `fleetvisor "
            "events`, or wait longer with --timeout",
            method=method,
            path=path,
        )


def _query_value(value: Any) -> Any:
    return str(value).lower() if isinstance(value, bool) else value


def _decode(response: httpx.Response, type_: type[T], method: str, path: str) -> T:
    status = response.status_code
    if status >= 400:
        try:
            error = msgspec.json.decode(response.content, type=ErrorBody).error
            message, code, detail = error.message, error.code, error.detail
        except msgspec.DecodeError:
            message, code, detail = f"{method} {path}: HTTP {status}", "", {}
        kind = BY_STATUS.get(status, ApiError)
        raise kind(message, status=status, code=code, detail=detail, method=method, path=path)
    if status == 204 or type_ is type(None):
        return None  # type: ignore[return-value]
    try:
        return msgspec.json.decode(response.content, type=type_)
    except msgspec.DecodeError as exc:
        raise ApiError(
            f"the controller's answer to {method} {path} is not what this client expects ({exc}); "
            "are the controller and the client the same version?",
            status=status,
            code="unexpected_answer",
            method=method,
            path=path,
        ) from None


async def _show_request(request: httpx.Request) -> None:
    """``-v``: each request on stderr as it leaves (never the token)."""
    request.extensions["fv_sent"] = time.monotonic()
    print(f"> {request.method} {request.url}", file=sys.stderr, flush=True)


async def _show_response(response: httpx.Response) -> None:
    sent = response.request.extensions.get("fv_sent", time.monotonic())
    took = (time.monotonic() - sent) * 1000
    print(f"< {response.status_code} {response.reason_phrase} ({took:.0f} ms)", file=sys.stderr, flush=True)
