"""Ending asyncio tasks for sure: shared by the agent and the controller (both import ``protocols``).

It imports nothing of ours.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], *, every_s: float = 0.1) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again any that is still running.

    One cancel is not always enough on Python 3.11: ``asyncio.wait_for`` (used inside libraries such
    as aiomqtt) swallows a cancellation that lands just as its inner future completes, and the task
    then runs on to its next await.
    """
    pending = [task for task in tasks if not task.done()]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=every_s)
        pending = [task for task in pending if not task.done()]
    await asyncio.gather(*tasks, return_exceptions=True)
