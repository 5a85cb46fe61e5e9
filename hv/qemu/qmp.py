"""One QMP session with one QEMU, over the ``qemu.qmp`` library, with timeouts and our errors.

:class:`QmpSession` is the boundary: every call has a timeout, and every ``qemu.qmp`` failure
(an error reply, a lost connection, a protocol error) or timeout leaves it as an
:class:`hv.driver.EngineError` that names the VM, the command and the reason. Cancellation is never
caught.

Events are handed to a callback as they arrive, instead of going through the library's default
listener: that one keeps every event in an unbounded history, which is right for a tool and a
leak in an agent that runs for months. The callback runs inside the library's reader task, so it
must not await QMP itself (it would wait for the very reader that is calling it).

:func:`run_status` reads ``query-status`` answers; :func:`poll` repeats a QMP query until its
answer is what the caller waits for. Imports: ``qemu.qmp`` and :mod:`hv.driver` (errors) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp.message import Message

from hv.driver import EngineError

__all__ = ["POLL_S", "SETTLE_TIMEOUT_S", "EventHandler", "QmpSession", "poll", "run_status"]

T = TypeVar("T")

#: How long the driver waits for QEMU to settle a cancel, a mirror's last copy or an export's removal.
SETTLE_TIMEOUT_S = 30.0
#: How often it asks meanwhile.
POLL_S = 0.01

log = logging.getLogger(__name__)

#: Where the library's own logging goes. Every failure it logs also reaches the driver as an
#: exception, which the driver reports with more context; so it is silent unless someone turns it
#: up to debug QMP itself.
_LIBRARY_LOG = logging.getLogger(f"{__name__}.client")
_LIBRARY_LOG.setLevel(logging.CRITICAL)

#: Called with the event name and its ``data`` member (empty when the event has none).
EventHandler = Callable[[str, Mapping[str, Any]], None]


class _Client(QMPClient):
    """A QMPClient that passes events to a callback and keeps none of them."""

    def __init__(self, name: str, on_event: EventHandler) -> None:
        super().__init__(name)
        self._on_event = on_event

    async def _event_dispatch(self, msg: Message) -> None:
        name = msg.get("event")
        data = msg.get("data")
        if not isinstance(name, str):
            return
        try:
            self._on_event(name, data if isinstance(data, Mapping) else {})
        except Exception:  # a handler bug must not tear down the QMP session
            log.exception("qmp %s: the handler of event %s failed", self.name, name)


class QmpSession:
    """The driver's QMP connection to one VM's QEMU."""

    def __init__(self, vm: str, on_event: EventHandler, *, timeout_s: float = 5.0) -> None:
        self.vm = vm
        self.timeout_s = timeout_s
        self._client = _Client(f"vm-{vm}", on_event)
        self._closing: asyncio.Future[None] | None = None
        # The library logs every closed connection; the driver reports what matters itself.
        self._client.logger = _LIBRARY_LOG

    @property
    def connected(self) -> bool:
        """Whether the session is up."""
        return self._client.runstate == Runstate.RUNNING

    async def wait_disconnected(self, timeout_s: float) -> None:
        """Until the session is down (QEMU closed its end, every message before that read), or at
        most ``timeout_s``.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._client.runstate == Runstate.RUNNING:
                    await self._client.runstate_changed()

    async def connect(self, sock: socket.socket, timeout_s: float) -> None:
        """Greet QEMU on the connected ``sock`` and negotiate capabilities.

        Raises:
            EngineError: QEMU did not answer within ``timeout_s``, closed the socket (it exited), or
                spoke something other than QMP.
        """
        try:
            await asyncio.wait_for(self._client.connect(sock), timeout_s)
        except TimeoutError:
            await self.close()
            raise EngineError(
                f"vm {self.vm!r}: qemu's monitor did not greet within {timeout_s:g}s; "
                "qemu may be hung or the host overloaded; see the VM's qemu.log"
            ) from None
        except (QMPError, OSError, EOFError) as exc:
            await self.close()
            raise EngineError(
                f"vm {self.vm!r}: could not open qemu's monitor: {_describe(exc)}; "
                "qemu probably exited; see the VM's qemu.log"
            ) from exc

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout_s: float | None = None
    ) -> object:
        """Run one QMP command and return its result.

        Raises:
            EngineError: QEMU refused the command (its error class and description are in the
                message), the connection is lost, or no reply came within the timeout.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise EngineError(f"vm {self.vm!r}: qemu refused {command}: {exc.error_class}: {exc}") from exc
        except TimeoutError:
            raise EngineError(
                f"vm {self.vm!r}: qemu did not answer {command} within {timeout:g}s; "
                "it may be hung; destroy the VM if this persists"
            ) from None
        except (ExecInterruptedError, QMPError, OSError, EOFError) as exc:
            raise EngineError(
                f"vm {self.vm!r}: lost qemu's monitor during {command}: {_describe(exc)}; "
                "qemu probably exited"
            ) from exc

    async def close(self) -> None:
        """Disconnect (once, however often it is called); errors of a connection that is already
        gone (QEMU exited) are expected and dropped.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._disconnect())
        # Shielded: a cancelled caller must not leave the library's reader tasks half torn down.
        await asyncio.shield(self._closing)

    async def _disconnect(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
            await asyncio.wait_for(self._client.disconnect(), self.timeout_s)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_status(result: object) -> str:
    """The run state in a ``query-status`` answer (``unknown`` when it has none)."""
    if isinstance(result, dict):
        return str(result.get("status", "unknown"))
    return "unknown"


async def poll(vm: str, get: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str) -> T:
    """``get()`` every :data:`POLL_S` until ``done`` says so.

    Raises:
        EngineError: not within :data:`SETTLE_TIMEOUT_S`.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        value = await get()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise EngineError(
                f"vm {vm!r}: waited {SETTLE_TIMEOUT_S:g}s for {what} in vain; qemu may be hung; "
                "destroy the VM if this persists"
            )
        await asyncio.sleep(POLL_S)
