"""Two live agents with one host id: told apart by their runs, and the newer one refused.

Each agent run has a boot id, carried by its online state and its inventory. A restart replaces a
run for good: the old one never speaks again. Two live agents with one host id (a copied config, a
cloned machine, stolen credentials) instead knock each other off the broker, because they share
its client id, and their runs keep coming back in turn: A, B, A, B. That is what this watches for,
on the online states: ``changes`` switches between runs within ``window_s``, one of them back to a
run seen before.

Then the run that held the host before the switching began is kept, and every other run seen in
the window is refused: an ``host.duplicate_agent`` event names both runs, what the controller did,
and what the operator should do; the refused run's states and inventories are ignored; and
:class:`~protocols.messages.AgentRefused` naming it goes on the host's command topic, again each
time it speaks (at most every ``resend_every_s``), until it stops. Both agents read that topic; the
refused one stops with that message, the other ignores it.

A stale message of an old run (a QoS 1 retry) brings it back once, where a refusal needs a run back
twice; a crash loop brings new runs, never an old one back. Neither is refused.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.common.tasks import TaskSet
from controller.services.agent_rpc import AgentRpc
from controller.state.events import EventHub
from protocols import codec, topics
from protocols.messages import AgentRefused

log = logging.getLogger(__name__)

#: Refused runs remembered per host (the oldest are forgotten first).
_REFUSED_PER_HOST = 16


@dataclass(frozen=True, slots=True)
class DuplicateSettings:
    #: Switches between runs within the window that make two live agents (A, B, A, B, A is four).
    changes: int = 4
    window_s: float = 30.0
    #: A refused run that speaks again is told again, at most this often.
    resend_every_s: float = 2.0


@dataclass(slots=True)
class _Host:
    current: str
    #: (when, run before, run after) of each switch, newest last.
    switches: deque[tuple[float, str, str]] = field(default_factory=lambda: deque(maxlen=64))
    #: Refused run -> (the run kept, when last told).
    refused: dict[str, tuple[str, float]] = field(default_factory=dict)


class DuplicateAgents:
    """Watches each host's runs and refuses the newer of two live ones (see the module docstring)."""

    def __init__(
        self,
        rpc: AgentRpc,
        events: EventHub,
        settings: DuplicateSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpc = rpc
        self.events = events
        self.settings = settings or DuplicateSettings()
        self._clock = clock
        self._hosts: dict[str, _Host] = {}
        self._tasks = TaskSet("duplicate agents")

    def online(self, host_id: str, boot_id: str) -> bool:
        """An online state of run ``boot_id``: whether to believe it (False: a refused run)."""
        now = self._clock()
        host = self._hosts.get(host_id)
        if host is None:
            self._hosts[host_id] = _Host(current=boot_id)
            return True
        if boot_id in host.refused:
            self._refuse_again(host_id, host, boot_id, now)
            return False
        if boot_id == host.current:
            return True
        host.switches.append((now, host.current, boot_id))
        host.current = boot_id
        recent = [s for s in host.switches if now - s[0] <= self.settings.window_s]
        seen_before = {s[1] for s in recent}
        if len(recent) < self.settings.changes or boot_id not in seen_before:
            return True
        kept = recent[0][1]  # the run that held the host before the switching began
        newer = {run for s in recent for run in s[1:]} - {kept}
        for run in sorted(newer):
            host.refused[run] = (kept, -float("inf"))
            while len(host.refused) > _REFUSED_PER_HOST:
                del host.refused[next(iter(host.refused))]
        host.current = kept
        host.switches.clear()
        message = (
            f"two agents are live as host {host_id}: they knocked each other off the broker {len(recent)} "
            f"times in {now - recent[0][0]:.0f}s. Kept run {kept[:8]}, which was there first; refused "
            f"{', '.join(r[:8] for r in sorted(newer))}, which is told to stop. If the refused one is the "
            "real host, stop the other agent; otherwise find the machine that runs a copy of this "
            "host's agent (a cloned disk or a copied config) and give it its own host id"
        )
        log.warning("host %s: %s", host_id, message)
        self.events.emit("host.duplicate_agent", message, host_id=host_id)
        for run in sorted(newer):
            self._refuse_again(host_id, host, run, now)
        return boot_id == kept

    def believes(self, host_id: str, boot_id: str) -> bool:
        """Whether a message of run ``boot_id`` (an inventory) is believed; a refused run is told again."""
        host = self._hosts.get(host_id)
        if host is None or boot_id not in host.refused:
            return True
        self._refuse_again(host_id, host, boot_id, self._clock())
        return False

    def kept(self, host_id: str) -> str | None:
        """The run the host's messages are believed from, when one was kept over another."""
        host = self._hosts.get(host_id)
        return host.current if host is not None else None

    def forget(self, host_id: str) -> None:
        self._hosts.pop(host_id, None)

    def _refuse_again(self, host_id: str, host: _Host, run: str, now: float) -> None:
        kept, told = host.refused[run]
        if now - told < self.settings.resend_every_s:
            return
        host.refused[run] = (kept, now)
        refusal = AgentRefused(
            host_id=host_id,
            boot_id=run,
            kept_boot_id=kept,
            ts=time.time(),
            reason="Its run and this one took turns on the broker's session.",
        )
        self._tasks.spawn(
            self.rpc.bus.publish(
                topics.host_topic(host_id, "cmd"), codec.encode(refusal), qos=1, expiry_s=60
            ),
            name=f"refuse:{host_id}:{run[:8]}",
        )

    async def close(self) -> None:
        await self._tasks.close()
