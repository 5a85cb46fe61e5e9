"""Commands to agents and their replies: the correlation of each reply with the command that asked.

:meth:`AgentRpc.exchange` sends a command until its reply arrives or its deadline passes, holding off
while the host is offline. Once the deadline has passed it asks the host one last time: the agent
answers from its ledger (the command was applied: its reply) or says the command expired (it was not,
and never will be), so a reply lost on the way (a broker killed, a controller restarted past the
deadline) still reaches its operation. The intake layer hands every reply to :meth:`AgentRpc.deliver`
with the host whose reply topic it came on; a reply that nobody waits for yet is kept (bounded) for
the exchange that will ask for it.

A reply counts only when it comes from the host its command was sent to: on that host's reply topic
(the broker's ACL ties the topic to the host's credentials) and naming that host. Any other host
that answers (a prepare reply carries the address a migration streams guest memory to) is counted
in :attr:`AgentRpc.forged`, logged, and completes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from typing import Any

from controller.state.store import Store
from protocols import codec, topics
from protocols.bus import Bus
from protocols.messages import Command, Reply

log = logging.getLogger(__name__)

#: Replies kept for an exchange that has not started yet (a resumed operation's answer).
EARLY_REPLIES = 10_000


class AgentRpc:
    """Sends commands to hosts and matches replies to them by operation id."""

    def __init__(self, bus: Bus, store: Store, retry_s: float) -> None:
        self.bus = bus
        self.store = store
        #: How long to wait for a reply before sending the command again (same operation id).
        self.retry_s = retry_s
        #: Each exchange under way: the host its command went to, and the future its reply completes.
        self._waiters: dict[str, tuple[str, asyncio.Future[Reply]]] = {}
        #: Replies that came before their exchange began, with the host whose topic they came on.
        self._early: OrderedDict[str, tuple[str, Reply]] = OrderedDict()
        #: Replies refused because another host than the command's sent them, by the sending host.
        self.forged: Counter[str] = Counter()
        self._online: dict[str, asyncio.Event] = {}

    def set_online(self, host_id: str, online: bool) -> None:
        """Note whether ``host_id`` is connected; exchanges waiting for it go on when it is."""
        event = self._online.setdefault(host_id, asyncio.Event())
        if online:
            event.set()
        else:
            event.clear()

    def deliver(self, reply: Reply, from_host: str) -> bool:
        """Hand ``reply``, which came on ``from_host``'s reply topic, to the exchange waiting for it.

        Returns False when none waits. A reply from another host than the one the command went to
        is forged: counted, logged, and it completes nothing (True: it was handled).
        """
        entry = self._waiters.get(reply.op_id)
        if entry is None:
            return False
        host_id, waiter = entry
        if not self.is_from(reply, from_host, host_id):
            return True
        if not waiter.done():
            waiter.set_result(reply)
        return True

    def is_from(self, reply: Reply, from_host: str, expected: str | None) -> bool:
        """Whether ``reply`` (on ``from_host``'s reply topic) comes from ``expected``; if not, count and
        log it as forged.
        """
        if from_host == expected and reply.host_id == expected:
            return True
        self.forged[from_host] += 1
        log.warning(
            "op %s: ignoring a reply from host %s (naming %s, ok=%s): the command went to %s, and only "
            "its host's reply counts; check %s (%d forged replies from it)",
            reply.op_id, from_host, reply.host_id, reply.ok, expected or "no host", from_host,
            self.forged[from_host],
        )  # fmt: skip
        return False

    def keep_early(self, reply: Reply, from_host: str) -> None:
        """Keep ``reply`` for an exchange that has not begun yet (bounded; the oldest go first)."""
        self._early[reply.op_id] = (from_host, reply)
        while len(self._early) > EARLY_REPLIES:
            self._early.popitem(last=False)

    async def send(self, host_id: str, command: Command, expiry_s: float) -> None:
        """Publish ``command`` once to ``host_id``, expecting no reply (refreshes, clean-ups)."""
        await self.bus.publish(
            topics.host_topic(host_id, "cmd"), codec.encode(command), qos=1, expiry_s=expiry_s
        )

    async def exchange(self, host_id: str, command: Command) -> Reply | None:
        """Send ``command`` to ``host_id`` until its reply arrives; None when its deadline passed and
        the last ask after it went unanswered too.

        While the host is offline nothing is sent; its persistent session may still deliver an earlier
        copy, and the command goes again when the host is back. The agent applies an operation id once.
        """
        early = self._early.pop(command.op_id, None)
        if early is not None and self.is_from(early[1], early[0], host_id):
            return early[1]
        topic = topics.host_topic(host_id, "cmd")
        payload = codec.encode(command)
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[command.op_id] = (host_id, waiter)
        online = self._online.setdefault(host_id, asyncio.Event())
        host = self.store.host(host_id)
        if host is not None and host.online:
            online.set()
        try:
            while True:
                remaining = command.deadline - time.time()
                if remaining <= 0:
                    return await self._last_ask(topic, payload, waiter, online)
                await self._attempt(topic, payload, waiter, online, remaining)
                if waiter.done():
                    return waiter.result()
        finally:
            self._waiters.pop(command.op_id, None)

    async def _last_ask(
        self, topic: str, payload: bytes, waiter: asyncio.Future[Reply], online: asyncio.Event
    ) -> Reply | None:
        """After the deadline: whether the host applied the command (its reply, or ``expired``).

        It waits one retry interval. None when the host is offline or does not answer in time: the
        outcome is unknown, and the host's next inventory tells.
        """
        if waiter.done():
            return waiter.result()
        if not online.is_set():
            return None
        await self.bus.publish(topic, payload, qos=1, expiry_s=self.retry_s)
        try:
            async with asyncio.timeout(self.retry_s):  # not wait_for, which can swallow a cancel (3.11)
                return await asyncio.shield(waiter)
        except TimeoutError:
            return None

    async def _attempt(
        self,
        topic: str,
        payload: bytes,
        waiter: asyncio.Future[Reply],
        online: asyncio.Event,
        remaining: float,
    ) -> None:
        """One send (when the host is online) and one bounded wait for the reply or the host."""
        if online.is_set():
            await self.bus.publish(topic, payload, qos=1, expiry_s=remaining)
            wait_for: asyncio.Future[Any] = waiter
        else:
            # Offline host: its persistent session may still deliver; re-send when it is back.
            wait_for = asyncio.ensure_future(online.wait())
        try:
            await asyncio.wait_for(
                asyncio.shield(waiter) if wait_for is waiter else _first(waiter, wait_for),
                min(remaining, self.retry_s),
            )
        except TimeoutError:
            pass
        finally:
            if wait_for is not waiter and not wait_for.done():
                wait_for.cancel()


async def _first(*futures: asyncio.Future[Any]) -> None:
    await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
