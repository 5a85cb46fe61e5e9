"""Time for the sim engine: the wall clock, or a virtual clock that moves only when told to.

The sim engine never reads time directly; it asks a :class:`Clock`. In production and the demo that
is a :class:`RealClock`. Fleet-scale tests and trace-driven evaluation share one :class:`VirtualClock`
between thousands of :class:`hv.sim.driver.SimDriver` objects in one process: the clock is a heap of
timers, nothing runs in the background, and time moves only when the test awaits
:meth:`VirtualClock.advance`. A driver with nothing booting therefore costs no task and no timer.

Timers are plain synchronous callbacks (``call_at``); coroutines wait with ``await clock.sleep(s)``.
"""

from __future__ import annotations

import abc
import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "RealClock", "Timer", "TimerHandle", "VirtualClock"]


class TimerHandle(Protocol):
    """What ``call_at`` returns: something that can be cancelled (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None: ...


class Clock(abc.ABC):
    """A source of time in seconds since the epoch (or since the start of a simulation)."""

    @abc.abstractmethod
    def now(self) -> float:
        """The current time in seconds."""

    @abc.abstractmethod
    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time (zero or less just yields once)."""

    @abc.abstractmethod
    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback()`` once the clock reaches ``when`` (at once, on the next turn, if past).

        Raises:
            RuntimeError: the clock needs a running event loop and there is none (RealClock).
        """

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback()`` after ``delay`` seconds of this clock's time.

        Raises:
            RuntimeError: as :meth:`call_at`.
        """
        return self.call_at(self.now() + delay, callback)


class RealClock(Clock):
    """Wall-clock time (``time.time``) and the running event loop's timers."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, when - time.time()), callback)


class Timer:
    """One pending callback on a :class:`VirtualClock`."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Make sure the callback never runs. Cancelling twice, or after it ran, does nothing."""
        self.cancelled = True


class VirtualClock(Clock):
    """Simulated time that stands still until :meth:`advance` moves it.

    ``advance`` fires due timers in deadline order (ties in the order they were set), setting
    :meth:`now` to each timer's deadline as it fires, and yields to the event loop after every
    deadline so that woken sleepers run, and may set new timers, before time moves on.

    Timer callbacks run synchronously inside ``advance``; an exception from one propagates to the
    caller of ``advance`` (timers not yet fired stay pending).
    """

    #: How many times ``advance`` yields to the loop after each deadline, so a woken coroutine
    #: that awaits a few already-finished things in a row still reaches its next sleep.
    SETTLE_YIELDS = 4

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._advancing = False

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(max(float(when), self._now), callback)
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self._now + delay, callback)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_at(self._now + seconds, wake)
        try:
            await future
        finally:
            timer.cancel()

    @property
    def pending(self) -> int:
        """How many timers are waiting (cancelled ones are not counted)."""
        return sum(1 for _, _, timer in self._heap if not timer.cancelled)

    def next_deadline(self) -> float | None:
        """When the earliest live timer is due, or None when there is none."""
        self._drop_cancelled_head()
        return self._heap[0][0] if self._heap else None

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing every timer due on the way.

        Raises:
            ValueError: ``seconds`` is negative (time never runs backwards).
            RuntimeError: ``advance`` is already running (called from a timer or a second task).
        """
        if seconds < 0:
            raise ValueError(f"cannot advance a virtual clock by {seconds} s: time never runs backwards")
        await self.advance_to(self._now + seconds)

    async def advance_to(self, when: float) -> None:
        """Move time forward to ``when``, firing every timer due on the way.

        Raises:
            ValueError: ``when`` is in the past.
            RuntimeError: ``advance`` is already running (called from a timer or a second task).
        """
        if when < self._now:
            raise ValueError(f"cannot move a virtual clock back from {self._now} to {when}")
        if self._advancing:
            raise RuntimeError("VirtualClock.advance is already running; advance from one task at a time")
        self._advancing = True
        try:
            await self._settle()
            while True:
                self._drop_cancelled_head()
                if not self._heap or self._heap[0][0] > when:
                    break
                self._now = self._heap[0][0]
                while self._heap and self._heap[0][0] <= self._now:
                    _, _, timer = heapq.heappop(self._heap)
                    if not timer.cancelled:
                        timer.cancelled = True  # a handle cancelled after firing must stay a no-op
                        timer.callback()
                await self._settle()
            self._now = when
            await self._settle()
        finally:
            self._advancing = False

    def _drop_cancelled_head(self) -> None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)

    async def _settle(self) -> None:
        for _ in range(self.SETTLE_YIELDS):
            await asyncio.sleep(0)
