"""The HTTP edge: what every connection and request passes before the API sees it.

Two guards, both bounded in memory and time:

- :func:`guarded_h11` is uvicorn's h11 protocol with a header deadline: a connection must send its
  complete request head within ``header_timeout_s`` of connecting (or of its previous response), and
  at most ``max_waiting`` connections may wait for their head at once; beyond that the oldest waiting
  one is closed. Half-open connections therefore cannot hold file descriptors or the connection cap.
- :class:`Edge` is an ASGI middleware in front of the application. It refuses, with the API's JSON
  error body, a request target that is too long (414), a ``Host`` that is not a name of this
  controller (421, against DNS rebinding), an ``Origin`` that is not allowed (403, against CSRF), a
  token in the query string (400, so it is never logged or stored), and a mutating request whose body
  is not JSON (415, which browsers cannot send cross-site without a preflight). It reads the body
  itself while it streams in, counting bytes, and answers 413 the moment the limit is passed (or at
  once, from ``Content-Length``), so no body larger than the limit is ever held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from controller.api.http import ApiError, error_response

log = logging.getLogger(__name__)

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
#: Query parameters that carry credentials; a URL ends up in logs, histories and Referer headers.
_CREDENTIAL_PARAMS = frozenset({"token", "access_token"})
#: How much of a refused (too large) body is read and dropped, and for how long, before answering.
DRAIN_BYTES = 16 * 1024 * 1024
DRAIN_S = 2.0


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    """What the edge accepts; built by the daemon from its flags."""

    #: Host header names (lower case, without port) this controller answers to.
    host_names: frozenset[str]
    #: The port the API listens on; a Host header with another port is refused.
    port: int
    #: Origins (``scheme://host[:port]``) allowed besides the controller's own.
    allowed_origins: frozenset[str] = frozenset()
    max_body_bytes: int = 1024 * 1024
    #: The whole body must arrive within this long once the head has.
    body_timeout_s: float = 30.0
    #: The longest request target (path and query) accepted.
    max_target_bytes: int = 4096


@dataclass(frozen=True, slots=True)
class EdgeOptions:
    """The edge's part of the controller's settings (``fleetvisor controller`` flags)."""

    #: Serve an API without tokens on a non-loopback address (refused unless this is set).
    insecure_no_auth: bool = False
    #: Origins (``scheme://host[:port]``) whose pages may call the API, besides its own.
    allowed_origins: tuple[str, ...] = ()
    #: Host names the API answers to besides its listen address (and localhost on loopback).
    server_names: tuple[str, ...] = ()
    max_body_bytes: int = 1024 * 1024
    #: Open API connections at most (uvicorn answers 503 beyond); half of them may wait for a head.
    max_connections: int = 1024
    #: A connection must send its request head within this long.
    header_timeout_s: float = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The edge's flags of ``fleetvisor controller``."""
    eo = EdgeOptions()
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow --listen on a non-loopback address without --auth (anyone who reaches it is an admin)",
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a scheme://host[:port] whose web pages may call the API (repeatable; default: its own only)",
    )
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients use for the API, besides the --listen address (repeatable; checked "
        "against the Host header, against DNS rebinding)",
    )
    p.add_argument(
        "--max-body",
        type=int,
        default=eo.max_body_bytes,
        metavar="BYTES",
        help="largest request body (default %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=eo.max_connections,
        metavar="N",
        help="open API connections at most (default %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=eo.header_timeout_s,
        metavar="S",
        help="an API connection must send its request head within this long (default %(default)s)",
    )


def options_of(args: argparse.Namespace) -> EdgeOptions:
    """The options of :func:`add_arguments`.

    Raises:
        ValueError: a limit is not above 0.
    """
    problems = [
        f"{flag} must be above 0 (got {value})"
        for flag, value in (
            ("--max-body", args.max_body),
            ("--max-connections", args.max_connections),
            ("--header-timeout", args.header_timeout),
        )
        if value <= 0
    ]
    if problems:
        raise ValueError("; ".join(problems))
    return EdgeOptions(
        insecure_no_auth=args.insecure_no_auth,
        allowed_origins=tuple(args.allowed_origin),
        server_names=tuple(args.server_name),
        max_body_bytes=args.max_body,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
    )


def check_exposure(listen: str, auth: bool, options: EdgeOptions) -> None:
    """Refuse an API open to the network without tokens; warn loudly when that risk is accepted.

    Raises:
        ValueError: ``listen`` is not loopback, auth is off and --insecure-no-auth is not given.
    """
    if auth or is_loopback(listen):
        return
    if not options.insecure_no_auth:
        raise ValueError(
            f"--listen {listen} serves the API beyond this machine, and without --auth anyone who reaches "
            "it is an admin; add --auth (tokens; the first admin token is written next to the store), or "
            "--insecure-no-auth to accept that risk"
        )
    log.warning("API on %s WITHOUT AUTH (--insecure-no-auth): anyone who reaches it is an admin", listen)


def request_checks(options: EdgeOptions, listen: str, port: int) -> EdgeSettings:
    """What :class:`Edge` checks for an API on ``listen``:``port``."""
    return EdgeSettings(
        host_names=host_names(listen, options.server_names),
        port=port,
        allowed_origins=frozenset(options.allowed_origins),
        max_body_bytes=options.max_body_bytes,
    )


def server_limits(options: EdgeOptions) -> dict[str, Any]:
    """Uvicorn's options for the connection limits: the guarded protocol, the cap, the timeouts."""
    return {
        "http": guarded_h11(options.header_timeout_s, max(1, options.max_connections // 2)),
        "limit_concurrency": options.max_connections,
        "timeout_keep_alive": 5,
        "h11_max_incomplete_event_size": 16 * 1024,
    }


def is_loopback(address: str) -> bool:
    """Whether ``address`` (a name or an IP address) is this machine only."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def host_names(listen: str, server_names: Iterable[str]) -> frozenset[str]:
    """The Host names a controller listening on ``listen`` answers to.

    The listen address itself (unless it is a wildcard), the localhost names when the API is reachable
    over loopback (a loopback or wildcard address), and every ``--server-name``.
    """
    names = {name.lower().strip("[]") for name in server_names}
    if listen not in _WILDCARDS:
        names.add(listen.lower().strip("[]"))
    if listen in _WILDCARDS or is_loopback(listen):
        names |= _LOOPBACK_NAMES
    return frozenset(names)


def _split_host(value: str) -> tuple[str, str]:
    """``name``, ``port`` (empty when absent) of a Host header value; IPv6 in brackets."""
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name.lower(), rest.removeprefix(":")
    name, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    return name.lower(), port


class Edge:
    """The ASGI middleware of the module docstring."""

    def __init__(self, app: ASGIApp, settings: EdgeSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._check_head(scope, headers)
            body = await self._read_body(headers, receive)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.detail)
            declared = headers.get("content-length", "")
            if exc.status == 413 and not (declared.isdigit() and int(declared) > DRAIN_BYTES):
                # A body a little too large is read to its end and dropped, so the client (still
                # sending) gets the answer rather than a reset; a huge one is cut off.
                await _drain(receive, DRAIN_BYTES, DRAIN_S)
            # The connection cannot carry another request.
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        except _Disconnected:
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_head(self, scope: Scope, headers: dict[str, str]) -> None:
        """Raises ApiError for the first thing wrong with the request head."""
        s = self.settings
        target = len(scope.get("raw_path", b"")) + len(scope["query_string"])
        if target > s.max_target_bytes:
            raise ApiError(
                414,
                "uri_too_long",
                f"the request target is {target} bytes, over the {s.max_target_bytes} byte limit; "
                "send long values in a JSON body",
            )
        host = headers.get("host", "")
        name, port = _split_host(host)
        if name not in s.host_names or (port and port != str(s.port)):
            raise ApiError(
                421,
                "wrong_host",
                f"the Host header {host!r} is not a name of this controller (it answers to "
                f"{', '.join(sorted(s.host_names))} on port {s.port}); call it by one of those, or start "
                f"the controller with --server-name {name or 'NAME'}",
                {"header": "Host"},
            )
        origin = headers.get("origin")
        if origin is not None and origin not in s.allowed_origins and origin != f"{scope['scheme']}://{host}":
            raise ApiError(
                403,
                "origin_not_allowed",
                f"the Origin header {origin!r} is not allowed: a page on another site may not use this API; "
                f"if that site is yours, start the controller with --allowed-origin {origin}",
                {"header": "Origin"},
            )
        query = urllib.parse.parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        if any(key.lower() in _CREDENTIAL_PARAMS for key, _ in query):
            raise ApiError(
                400,
                "token_in_url",
                "a token in the URL is refused (URLs end up in logs and histories); send it in the "
                "header 'Authorization: Bearer <token>' (the CLI's --token or FLEETVISOR_TOKEN)",
                {"header": "Authorization"},
            )
        if scope["method"] in _MUTATING:
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
            if (media or has_body) and media != "application/json":
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"{scope['method']} needs 'Content-Type: application/json' "
                    f"(got {media or 'none'}); send the body as JSON, or send no body",
                    {"header": "Content-Type"},
                )

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        """The whole body, read while it streams in and never more than the limit.

        Raises:
            ApiError: 413 over the limit, 408 when it arrives too slowly.
            _Disconnected: the client went away.
        """
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(f"Content-Length says {declared} bytes", limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Disconnected
                    chunk: bytes = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(f"the body passed {limit} bytes while streaming", limit)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise ApiError(
                408,
                "body_timeout",
                f"the request body did not arrive within {self.settings.body_timeout_s:g} s; "
                "send it at once, or check the network",
            ) from None


async def _drain(receive: Receive, cap: int, timeout_s: float) -> None:
    """Read and drop what is left of a refused body, up to ``cap`` bytes and ``timeout_s`` seconds."""
    seen = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while seen <= cap:
                message = await receive()
                seen += len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return


class _Disconnected(Exception):
    """The client closed the connection before its body was complete."""


def _too_large(why: str, limit: int) -> ApiError:
    return ApiError(
        413,
        "body_too_large",
        f"the request body is too large: {why}, over the limit of {limit} bytes; send less, or start "
        "the controller with a larger --max-body",
        {"header": "Content-Length"},
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body read by the edge once, then waits on the client's own."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _HeadGuard:
    """The connections of one server that wait for a request head, oldest first, and the limits."""

    def __init__(self, timeout_s: float, max_waiting: int) -> None:
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.waiting: dict[GuardedH11, None] = {}
        self.closed = 0

    def closed_one(self, why: str, client: tuple[str, int] | None) -> None:
        self.closed += 1
        if self.closed in (1, 10, 100) or self.closed % 1000 == 0:
            log.warning(
                "API: closed %d connection(s) that did not send a request head in time (%s; %g s "
                "allowed, at most %d waiting at once); the last from %s",
                self.closed,
                why,
                self.timeout_s,
                self.max_waiting,
                client[0] if client else "?",
            )


class GuardedH11(H11Protocol):
    """The h11 protocol of the module docstring; :func:`guarded_h11` gives it its guard."""

    guard: ClassVar[_HeadGuard]
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._await_head()

    def handle_events(self) -> None:
        super().handle_events()
        if self in self.guard.waiting and self.conn.their_state is not h11.IDLE:
            self._head_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._head_arrived()
        waiting = self.guard.waiting
        waiting[self] = None
        self._head_timer = self.loop.call_later(self.guard.timeout_s, self._give_up, "too slow")
        if len(waiting) > self.guard.max_waiting:
            next(iter(waiting))._give_up("too many waiting; the oldest closed")

    def _head_arrived(self) -> None:
        self.guard.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _give_up(self, why: str) -> None:
        """Close a connection that has not sent its request head."""
        self._head_arrived()
        if not self.transport.is_closing():
            self.transport.close()
        self.guard.closed_one(why, self.client)


def guarded_h11(header_timeout_s: float, max_waiting: int) -> type[H11Protocol]:
    """The protocol class for one uvicorn server, with its own guard."""
    return type("GuardedH11", (GuardedH11,), {"guard": _HeadGuard(header_timeout_s, max_waiting)})
