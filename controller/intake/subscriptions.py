"""The controller's bus subscriptions: each message is admitted per host, decoded, checked, and
handed to the service that owns it.

Admission runs as each message leaves the socket, before any queue (``Bus.admit_with``): a retained
copy on a news topic is refused, the per-host rate limit applies, telemetry counts as the host's
heartbeat right there, and what passes waits in its host's lane of the bus queue, taken round-robin.
So a host that floods meets its limit before its messages can stand in front of its neighbours',
and no queue lies between a healthy host and the HA failure detector.

Handlers run in the bus client's receive loop, so they are quick and never await. Routing:

| topic family | goes to |
|---|---|
| ``telemetry`` (own connection) | HA's heartbeat (at admission), then :class:`~controller.state.live.LiveState` |
| ``state`` | HA's view of the connection, then :class:`~controller.services.hosts.HostService` |
| ``inventory`` | :meth:`HostService.on_inventory <controller.services.hosts.HostService.on_inventory>` |
| ``events`` | migration progress to the migration service, VM events to the VM service |
| ``reply`` | :class:`~controller.services.agent_rpc.AgentRpc`, or the VM service for a late one |

What a host has no standing to say is refused and counted by :mod:`controller.intake.guards`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from controller.intake import guards
from controller.intake.rate_limit import Gate, InboundLimiter, RateLimits
from controller.services.agent_rpc import AgentRpc
from controller.services.ha.manager import HaService
from controller.services.hosts import HostService
from controller.services.migration.migrate import MigrationService
from controller.services.vms import VmService
from controller.state.live import LiveState
from protocols import codec, topics
from protocols.bus import Bus
from protocols.messages import HostInventory, HostState, HostTelemetry, MigrationProgress, Reply, VmEvent

log = logging.getLogger(__name__)

BusHandler = Callable[[str, bytes], None]

#: Topics whose rate-limit gates admission keeps at hand (five per host).
_MAX_TOPICS = 200_000


@dataclass(frozen=True, slots=True)
class IntakeSettings:
    limits: RateLimits = field(default_factory=RateLimits)
    guards: guards.GuardSettings = field(default_factory=guards.GuardSettings)


class _Route:
    """What admission needs of one topic, worked out on its first message."""

    __slots__ = ("gate", "heartbeat", "host_id", "keeps_newest", "no_retained")

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.host_id = gate.host_id
        self.heartbeat = gate.family == "telemetry"
        self.no_retained = gate.family in guards.NO_RETAINED
        #: The key of the held-back message, for the families whose newest message is kept.
        self.keeps_newest = (gate.host_id, gate.family) if gate.family in ("state", "inventory") else None


class Intake:
    """Subscribes to every host's topics and routes what arrives."""

    def __init__(
        self,
        bus: Bus,
        telemetry_bus: Bus,
        live: LiveState,
        rpc: AgentRpc,
        hosts: HostService,
        vms: VmService,
        migrations: MigrationService,
        ha: HaService,
        settings: IntakeSettings | None = None,
    ) -> None:
        settings = settings or IntakeSettings()
        self.live = live
        self.rpc = rpc
        self.hosts = hosts
        self.vms = vms
        self.migrations = migrations
        self.ha = ha
        self.store = hosts.store
        self.decoder = codec.InboundDecoder()
        self.limiter = InboundLimiter(settings.limits)
        #: Each topic's route, so admission parses a topic once, not per message.
        self._routes: dict[str, _Route] = {}
        self._max_bytes = self.decoder.max_bytes
        #: Messages refused by the guards (a forged reply is counted in ``rpc.forged``).
        self.guards = guards.GuardCounters(settings.guards.log_every_s)
        self.sequence = guards.SequenceGuard(settings.guards)
        #: The newest state or inventory of a host held back by its rate (topic, payload).
        self._deferred: dict[tuple[str, str], tuple[str, bytes]] = {}
        self._handlers: dict[str, BusHandler] = {
            "state": self._on_state,
            "inventory": self._on_inventory,
            "events": self._on_event,
            "reply": self._on_reply,
            "telemetry": self._on_telemetry,
        }
        for family in ("state", "inventory", "events", "reply"):
            bus.subscribe(topics.all_hosts(family), self._handlers[family], qos=1)
        telemetry_bus.subscribe(topics.all_hosts("telemetry"), self._on_telemetry, qos=0)
        bus.admit_with(self._admit)
        telemetry_bus.admit_with(self._admit)
        bus.on_connect(hosts.refresh_inventories)

    def _admit(self, topic: str, payload: bytes, retain: bool) -> str | None:
        """The lane of a message as it arrives (its host's), or None to drop it; before any queue.

        A retained copy on a news topic is refused. Over the rate limit, telemetry, events and
        replies are dropped (and counted). A host's state and inventory are not: each message
        replaces the last, so the newest is kept aside and handled when the host's bucket allows.
        Dropping it would leave the controller with a stale picture until the host's next change,
        which may never come.

        It runs for every message, so what can be worked out once per topic is (:class:`_Route`).
        """
        route = self._routes.get(topic)
        if route is None:
            parts = topic.split("/", 5)
            if len(parts) != 5:
                return ""  # not a host topic: the decoder refuses and counts it
            if len(self._routes) >= _MAX_TOPICS:
                self._routes.clear()  # only a broker without per-host ACLs lets this many ids speak
            route = self._routes[topic] = _Route(self.limiter.gate(parts[3], parts[4]))
        size = len(payload)
        if size > self._max_bytes:
            self.decoder.decode(topic, payload)  # refuses it as oversize, counted, before it is queued
            return None
        if retain and route.no_retained:
            self.guards.refuse(
                "retained", route.host_id, f"ignoring a retained message on its {route.gate.family} topic; "
                f"clear it with an empty retained publish to {topic}",
            )  # fmt: skip
            return None
        if not self.limiter.take(route.gate, size):
            if route.keeps_newest is not None:
                self._deferred[route.keeps_newest] = (topic, payload)
            return None
        if route.heartbeat:
            self.ha.heartbeat(route.host_id)
        elif route.keeps_newest is not None:
            self._deferred.pop(route.keeps_newest, None)  # this newer message supersedes a held-back one
        return route.host_id

    async def drain_deferred(self) -> None:
        """Handle the newest held-back state or inventory of each host as its rate allows, and sum up
        the rate limit's drops, forever.
        """
        while True:
            await asyncio.sleep(0.1)
            self.limiter.report()
            for key in list(self._deferred):
                if self.limiter.allow(*key, count_drop=False):
                    topic, payload = self._deferred.pop(key)
                    try:
                        self._handlers[key[1]](topic, payload)
                    except Exception:
                        log.exception("handling a held-back %s of %s failed", key[1], key[0])

    def _decode(self, topic: str, payload: bytes) -> msgspec.Struct | None:
        return self.decoder.decode(topic, payload)

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if isinstance(message, HostTelemetry):  # its numbers are bounded by the wire schema
            self.live.record_telemetry(message)

    def _on_state(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if isinstance(message, HostState) and self.hosts.accepts_state(message):
            self.ha.host_state(message.host_id, message.online, message.reason)
            self.hosts.apply_state(message)

    def _on_inventory(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if not isinstance(message, HostInventory):
            return
        why = self.sequence.problem(message)
        if why is not None:
            self.guards.refuse("seq", message.host_id, why)
            return
        self.hosts.on_inventory(message)
        if self.live.inventories.get(message.host_id) is message:
            self.sequence.accepted(message)
            if any(self.store.vm(vm.name) is None for vm in message.vms):
                # Adoption is capped per round: the next round (as the rate allows) takes more.
                self._deferred.setdefault((message.host_id, "inventory"), (topic, payload))

    def _on_event(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if not isinstance(message, (MigrationProgress, VmEvent)):
            return
        why = guards.event_problem(self.store, message)
        if why is not None:
            self.guards.refuse("event", message.host_id, why)
        elif isinstance(message, MigrationProgress):
            self.migrations.on_progress(message)
        elif isinstance(message, VmEvent):
            self.vms.on_event(message)

    def _on_reply(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if not isinstance(message, Reply) or message.op_id.startswith("refresh-"):
            return  # a refresh's inventory is what matters, not its reply
        host_id = message.host_id  # the decoder checked that it is the topic's host
        if self.rpc.deliver(message, host_id):
            return
        op = self.store.operation(message.op_id)
        if op is not None and op.state == "failed":
            if op.kind != "delete" or self.rpc.is_from(message, host_id, op.host_id):
                self.vms.settle_late_reply(message)  # only a late delete changes a record
            return
        self.rpc.keep_early(message, host_id)
