"""The qemu engine's few background tasks: QMP disconnects and migration switchovers.

They start from callbacks that cannot await (QEMU's exit, a QMP event), so they run as tasks that
:class:`BackgroundTasks` keeps, logs when they fail, and lets finish (or cancels) when the driver
closes. Imports: the standard library only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["BackgroundTasks"]

log = logging.getLogger(__name__)


class BackgroundTasks:
    """The set of background tasks of one driver."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` as a task named ``name``; a failure is logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "qemu host %s: task %s failed", self.host_id, task.get_name(), exc_info=task.exception()
            )

    async def drain(self, timeout_s: float) -> None:
        """Let the tasks finish within ``timeout_s``, then cancel the rest and wait for them."""
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
