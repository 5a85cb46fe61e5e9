"""``client.operations``: show, list, wait for, follow and cancel operations of every kind.

Every change the controller makes is an operation (``create``, ``migrate``, ``evacuate``, ``bulk``,
``rolling``...): persistent, resumed after a controller restart, and shown by ``get`` with its
``params`` (phase, per-target results) and, for a migration under way, its ``progress``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from urllib.parse import quote

from controller.client.errors import NoAnswer, OperationFailed
from controller.client.transport import Transport
from protocols import rest

#: The longest one long-poll is held open; ``wait`` asks again until its own deadline.
_POLL_S = 60.0


class Operations:
    """The fleet's operations."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def get(self, op_id: str, *, wait: float = 0.0) -> rest.OperationView:
        """One operation; with ``wait``, the answer is held until it ends or ``wait`` seconds pass."""
        return await self._t.call("GET", _path(op_id), rest.OperationView, params={"wait": wait or None})

    async def list(
        self,
        *,
        kind: str | None = None,
        state: str | None = None,
        host: str | None = None,
        vm: str | None = None,
        parent: str | None = None,
        since: float | None = None,
        limit: int = 100,
        page: str | None = None,
    ) -> rest.OperationPage:
        """One page of operations, newest first; ``page`` is the ``next`` of the page before."""
        params = {"kind": kind, "state": state, "host": host, "vm": vm, "parent": parent, "since": since,
                  "limit": limit, "page": page}  # fmt: skip
        return await self._t.call("GET", "/operations", rest.OperationPage, params=params)

    async def iterate(
        self,
        *,
        kind: str | None = None,
        state: str | None = None,
        host: str | None = None,
        vm: str | None = None,
        parent: str | None = None,
        since: float | None = None,
        page_size: int = 200,
    ) -> AsyncIterator[rest.OperationView]:
        """Every operation that matches, newest first, page after page."""
        page: str | None = None
        while True:
            found = await self.list(kind=kind, state=state, host=host, vm=vm, parent=parent, since=since,
                                    limit=page_size, page=page)  # fmt: skip
            for op in found.operations:
                yield op
            if found.next is None:
                return
            page = found.next

    async def cancel(self, op_id: str, *, wait: float = 0.0) -> rest.OperationView:
        """Cancel a running operation: a migration before its switch-over, an evacuation, a bulk
        action or a roll (pending targets are not started; running ones finish or roll back).
        """
        return await self._t.call(
            "POST", f"{_path(op_id)}/cancel", rest.OperationView, params={"wait": wait or None}
        )

    async def wait(
        self, op_id: str, *, timeout: float | None = None, check: bool = False
    ) -> rest.OperationView:
        """The operation once it has ended (long-polling, so no busy loop).

        Raises ``NoAnswer`` if it still runs after ``timeout`` seconds (None: wait for good), and
        with ``check`` ``OperationFailed`` when it ended ``failed``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            op = await self.get(op_id, wait=max(left, 0.001))
            if op.state != "running":
                if check and op.state == "failed":
                    raise OperationFailed(op)
                return op
            if deadline is not None and time.monotonic() >= deadline:
                raise NoAnswer(
                    f"operation {op_id} ({op.kind}) still runs after {timeout:g}s; it goes on: wait again, "
                    f"or cancel it with `fleetvisor op cancel {op_id}`",
                    code="still_running",
                    detail={"op_id": op_id},
                )

    async def follow(
        self, op_id: str, *, interval: float = 1.0, changes_only: bool = True
    ) -> AsyncIterator[rest.OperationView]:
        """The operation each time it changes (phase, progress, results), ending with its last view.

        Each step long-polls for at most ``interval`` seconds; with ``changes_only=False`` every step
        yields, changed or not, so a caller with its own deadline sees the time pass.
        """
        last: rest.OperationView | None = None
        while True:
            op = await self.get(op_id, wait=interval if last is not None else 0.0)
            if op != last or not changes_only:
                yield op
                last = op
            if op.state != "running":
                return

    async def continue_host(
        self, op_id: str, host: str, *, ok: bool = True, message: str = ""
    ) -> rest.OperationView:
        """A rolling maintenance's operator step on ``host`` is over (``ok``) or failed (the roll stops)."""
        body = rest.ContinueRequest(host=host, ok=ok, message=message)
        return await self._t.call("POST", f"{_path(op_id)}/continue", rest.OperationView, body=body)


def _path(op_id: str) -> str:
    return f"/operations/{quote(op_id, safe='')}"
