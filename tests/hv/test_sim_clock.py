"""The sim engine's clocks: a virtual clock that moves only when told to, and the wall clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from hv.sim.clock import RealClock, VirtualClock


async def test_virtual_time_stands_still_until_advanced() -> None:
    """A VirtualClock starts where it is told and moves only through advance()."""
    clock = VirtualClock(start=100.0)
    await asyncio.sleep(0.01)
    assert clock.now() == 100.0
    await clock.advance(2.5)
    assert clock.now() == 102.5


async def test_sleepers_wake_in_deadline_order_at_their_deadline() -> None:
    """Sleepers wake in deadline order, each seeing now() equal to its own deadline."""
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(label: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((label, clock.now()))

    tasks = [asyncio.create_task(sleeper(label, s)) for label, s in (("c", 3.0), ("a", 1.0), ("b", 2.0))]
    await asyncio.sleep(0)  # let them register their timers
    await clock.advance(2.5)
    assert woke == [("a", 1.0), ("b", 2.0)]
    await clock.advance(0.5)
    assert woke == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    await asyncio.gather(*tasks)


async def test_a_sleeper_that_sleeps_again_within_the_window_wakes_twice() -> None:
    """A coroutine sleeping in a loop gets every tick inside one advance(), not just the first."""
    clock = VirtualClock()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            await clock.sleep(1.0)
            ticks.append(clock.now())

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await clock.advance(5.5)
    assert ticks == [1.0, 2.0, 3.0, 4.0, 5.0]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_call_at_fires_in_deadline_then_insertion_order_and_skips_cancelled() -> None:
    """Timers fire by deadline, ties in the order set; a cancelled timer never fires."""
    clock = VirtualClock()
    fired: list[str] = []
    clock.call_at(2.0, lambda: fired.append("late"))
    clock.call_at(1.0, lambda: fired.append("first"))
    clock.call_at(1.0, lambda: fired.append("second"))
    cancelled = clock.call_later(1.5, lambda: fired.append("cancelled"))
    cancelled.cancel()
    assert clock.pending == 3
    assert clock.next_deadline() == 1.0
    await clock.advance(1.9)
    assert fired == ["first", "second"]
    await clock.advance(0.1)
    assert fired == ["first", "second", "late"]
    assert clock.pending == 0
    assert clock.next_deadline() is None


async def test_timer_set_in_the_past_fires_on_the_next_advance() -> None:
    """A deadline already past fires at the current time on the next advance, even advance(0)."""
    clock = VirtualClock(start=10.0)
    seen: list[float] = []
    clock.call_at(3.0, lambda: seen.append(clock.now()))
    await clock.advance(0)
    assert seen == [10.0]


async def test_cancelled_sleep_leaves_no_timer_behind() -> None:
    """Cancelling a task that sleeps on the virtual clock removes its timer."""
    clock = VirtualClock()
    task = asyncio.create_task(clock.sleep(60))
    await asyncio.sleep(0)
    assert clock.pending == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.pending == 0


async def test_advance_refuses_negative_time_and_reentry() -> None:
    """Time never runs backwards, and advance() cannot be called from inside a timer."""
    clock = VirtualClock(start=5.0)
    with pytest.raises(ValueError, match="never runs backwards"):
        await clock.advance(-1)
    with pytest.raises(ValueError, match=r"back from 5\.0 to 4\.0"):
        await clock.advance_to(4.0)

    errors: list[BaseException] = []

    def reenter() -> None:
        coro = clock.advance(1)
        try:
            coro.send(None)
        except RuntimeError as exc:
            errors.append(exc)
        finally:
            coro.close()

    clock.call_later(1, reenter)
    await clock.advance(2)
    assert len(errors) == 1
    assert "already running" in str(errors[0])
    assert clock.now() == 7.0


async def test_real_clock_follows_wall_time_and_fires_timers() -> None:
    """RealClock reads time.time(), sleeps for real and runs call_later callbacks on the loop."""
    clock = RealClock()
    assert abs(clock.now() - time.time()) < 1.0
    fired = asyncio.Event()
    before = clock.now()
    clock.call_later(0.01, fired.set)
    await asyncio.wait_for(fired.wait(), timeout=5)
    await clock.sleep(0.01)
    assert clock.now() - before >= 0.015
