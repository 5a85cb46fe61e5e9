"""A TCP proxy that makes a link lossy and jittery, where netem is not available.

TCP hides loss from applications; what they see is delay. A lost segment costs a retransmission
timeout (200 ms at least on Linux, doubling on repeats), and jitter spreads every delivery. The proxy
reproduces that in user space: each chunk is delayed by a random jitter, and with probability ``loss``
also by a retransmission stall (200 ms, then 400 ms with probability ``loss`` again, and so on). Order
is kept, as TCP keeps it.

This kernel has no ``sch_netem``, so ``tc qdisc add ... netem`` fails; this proxy stands in for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from types import TracebackType
from typing import Self


class LossyProxy:
    """``async with LossyProxy(upstream_port, loss=0.05, jitter_s=0.03) as proxy: proxy.port``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        loss: float = 0.05,
        jitter_s: float = 0.03,
        rto_s: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.loss = loss
        self.jitter_s = jitter_s
        self.rto_s = rto_s
        self.rng = random.Random(seed)
        self.port = 0
        self.stalls = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def delay(self) -> float:
        """Jitter plus retransmission stalls for one chunk."""
        delay = self.rng.uniform(0, self.jitter_s)
        rto = self.rto_s
        while self.rng.random() < self.loss:
            self.stalls += 1
            delay += rto
            rto *= 2
        return delay

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    sink.close()
                    return
                sink.write(data)
                await sink.drain()

        deliverer = asyncio.ensure_future(deliver())
        last_due = 0.0
        try:
            while True:
                data = await source.read(65536)
                last_due = max(last_due, loop.time() + self.delay())  # in order, like TCP
                await queue.put((last_due, data))
                if not data:
                    break
            await deliverer
        except (ConnectionError, OSError):
            pass
        finally:
            deliverer.cancel()
            with contextlib.suppress(Exception):
                sink.close()
