"""A guarded set of background tasks: named, logged when they fail or return unexpectedly, and
cancelled and awaited on close.

Every task the controller starts belongs to one: the daemon's long-lived loops, each service's
operation runners, recoveries and clean-ups. Nothing is fire-and-forget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from protocols.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class TaskSet:
    """Tasks owned by one component, cancelled and awaited by :meth:`close`."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, *, forever: bool = False) -> asyncio.Task[Any]:
        """Run ``coro`` as a task named ``name``. With ``forever``, a return is logged as unexpected.

        Raises:
            RuntimeError: after :meth:`close` began (the coroutine is closed, not run).
        """
        if self._closing:
            coro.close()
            raise RuntimeError(f"{self.owner} is closing; {name} was not started")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, forever))
        return task

    def _done(self, task: asyncio.Task[Any], forever: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s: task %s failed", self.owner, task.get_name(), exc_info=exc)
        elif forever and not self._closing:
            log.error(
                "%s: task %s returned; it should run until the controller stops", self.owner, task.get_name()
            )

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait for all of them to end."""
        self._closing = True
        await cancel_and_wait(list(self._tasks))
