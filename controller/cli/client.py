"""The REST client of the operator CLI: ``ApiClient`` over ``/api/v1``, and ``CliError``.

Every other module of ``controller.cli`` talks to the controller through this one. A transport
failure or an HTTP error becomes a ``CliError`` here, at the boundary, phrased for the person at
the terminal. It imports only third-party packages (httpx); nothing of ``controller``.
"""

from __future__ import annotations

import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_FAILED = 1
EXIT_UNREACHABLE = 3
#: After Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to print for the operator as it is; ``exit_code`` is the process's exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ApiClient:
    """A thin synchronous client of ``/api/v1``."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 30.0,
        token: str | None = None,
        ca_file: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        hooks: dict[str, list[Callable[..., Any]]] = (
            {"request": [_show_request], "response": [_show_response]} if verbose else {}
        )
        self._http = httpx.Client(
            base_url=f"{self.base_url}/api/v1",
            timeout=timeout,
            headers=headers,
            verify=verify,
            event_hooks=hooks,
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return its decoded JSON body (None for 204).

        Raises ``CliError`` with the controller's own message on an HTTP error, and with
        ``EXIT_UNREACHABLE`` when the controller cannot be reached.
        """
        wait = (kwargs.get("params") or {}).get("wait")
        if wait is not None and "timeout" not in kwargs:
            # The controller holds the answer up to ``wait`` seconds: never give up on it sooner.
            kwargs["timeout"] = float(wait) + self._http.timeout.read if self._http.timeout.read else None
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ReadTimeout:
            raise CliError(
                f"the controller at {self.base_url} accepted {method} {path} but did not answer in time; "
                "it is reachable, and the operation may still be running: see `fleetvisor vm show` or "
                "`fleetvisor events`, or wait longer with --timeout",
            ) from None
        except httpx.TransportError as exc:
            raise CliError(
                f"cannot reach the controller at {self.base_url} ({exc}); start it with `fleetvisor controller` "
                "or `fleetvisor demo`, or point --url / FLEETVISOR_URL at it",
                EXIT_UNREACHABLE,
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 204:
            return None
        if response.status_code >= 400:
            message = body.get("error", {}).get("message") if isinstance(body, dict) else None
            raise CliError(message or f"{method} {path}: HTTP {response.status_code}")
        return body


def _show_request(request: httpx.Request) -> None:
    """``-v``: each request on stderr as it leaves (never the token)."""
    request.extensions["fv_sent"] = time.monotonic()
    print(f"> {request.method} {request.url}", file=sys.stderr, flush=True)


def _show_response(response: httpx.Response) -> None:
    sent = response.request.extensions.get("fv_sent", time.monotonic())
    took = (time.monotonic() - sent) * 1000
    print(f"< {response.status_code} {response.reason_phrase} ({took:.0f} ms)", file=sys.stderr, flush=True)
