"""The guarded task set: failures and unexpected returns are logged, and close cancels and awaits all."""

from __future__ import annotations

import asyncio
import logging

import pytest

from controller.common.tasks import TaskSet


async def test_a_failing_task_is_logged_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    """A task that raises is logged (name and traceback) instead of vanishing."""

    async def boom() -> None:
        raise RuntimeError("kaput")

    tasks = TaskSet("tester")
    task = tasks.spawn(boom(), name="boom")
    with caplog.at_level(logging.ERROR):
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    assert any("task boom failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert len(tasks) == 0


async def test_a_loop_that_returns_is_logged_as_unexpected(caplog: pytest.LogCaptureFixture) -> None:
    """A task spawned with forever=True that returns is an error in the log."""

    async def quits() -> None:
        return None

    tasks = TaskSet("tester")
    with caplog.at_level(logging.ERROR):
        await tasks.spawn(quits(), name="loop", forever=True)
        await asyncio.sleep(0)
    assert any("task loop returned" in r.getMessage() for r in caplog.records)


async def test_close_cancels_and_awaits_every_task_and_refuses_new_ones() -> None:
    """close() leaves no task running, and a spawn after it is refused without running the coroutine."""
    started = asyncio.Event()
    cancelled = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    tasks = TaskSet("tester")
    task = tasks.spawn(forever(), name="sleeper", forever=True)
    await started.wait()
    await tasks.close()
    assert task.cancelled() and cancelled == [True] and len(tasks) == 0
    ran = []

    async def late() -> None:
        ran.append(True)

    with pytest.raises(RuntimeError, match="closing; late was not started"):
        tasks.spawn(late(), name="late")
    await asyncio.sleep(0)
    assert ran == []
