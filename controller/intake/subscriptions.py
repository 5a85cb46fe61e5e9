"""The controller's bus subscriptions: each message is rate-limited per host, decoded, and handed to
the service that owns it.

Handlers run in the bus client's receive loop, so they are quick and never await. Routing:

| topic family | goes to |
|---|---|
| ``telemetry`` (own connection) | :class:`~controller.state.live.LiveState`, then HA's heartbeat |
| ``state`` | HA's view of the connection, then :class:`~controller.services.hosts.HostService` |
| ``inventory`` | :meth:`HostService.on_inventory <controller.services.hosts.HostService.on_inventory>` |
| ``events`` | migration progress to the migration service, VM events to the VM service |
| ``reply`` | :class:`~controller.services.agent_rpc.AgentRpc`, or the VM service for a late one |
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec

from controller.intake.rate_limit import InboundLimiter
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
    ) -> None:
        self.live = live
        self.rpc = rpc
        self.hosts = hosts
        self.vms = vms
        self.migrations = migrations
        self.ha = ha
        self.decoder = codec.InboundDecoder()
        self.limiter = InboundLimiter()
        self._deferred: dict[tuple[str, str], tuple[BusHandler, str, bytes]] = {}
        for family, handler in (
            ("state", self._on_state),
            ("inventory", self._on_inventory),
            ("events", self._on_event),
            ("reply", self._on_reply),
        ):
            bus.subscribe(topics.all_hosts(family), self._limited(handler), qos=1)  # type: ignore[arg-type]
        telemetry_bus.subscribe(topics.all_hosts("telemetry"), self._limited(self._on_telemetry), qos=0)
        bus.on_connect(hosts.refresh_inventories)

    def _limited(self, handler: BusHandler) -> BusHandler:
        """Wrap a bus handler with the per-host rate limit (checked before any decoding).

        Over the limit, telemetry, events and replies are dropped (and counted). A host's state and
        inventory are not: each message replaces the last, so the newest is kept aside and handled
        when the host's bucket allows. Dropping it would leave the controller with a stale picture
        until the host's next change, which may never come.
        """
        limiter = self.limiter
        deferred = self._deferred

        def limited(topic: str, payload: bytes) -> None:
            parts = topic.split("/", 5)
            if len(parts) == 5:
                if not limiter.allow(parts[3], parts[4]):
                    if parts[4] in ("state", "inventory"):
                        deferred[(parts[3], parts[4])] = (handler, topic, payload)
                    return
                deferred.pop((parts[3], parts[4]), None)  # this newer message supersedes a held-back one
            handler(topic, payload)

        return limited

    async def drain_deferred(self) -> None:
        """Handle the newest held-back state or inventory of each host as its rate allows, forever."""
        while True:
            await asyncio.sleep(0.1)
            for key in list(self._deferred):
                if self.limiter.allow(*key, count_drop=False):
                    handler, topic, payload = self._deferred.pop(key)
                    try:
                        handler(topic, payload)
                    except Exception:
                        log.exception("handling a held-back %s of %s failed", key[1], key[0])

    def _decode(self, topic: str, payload: bytes) -> msgspec.Struct | None:
        return self.decoder.decode(topic, payload)

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if isinstance(message, HostTelemetry):
            self.live.record_telemetry(message)
            self.ha.heartbeat(message.host_id)

    def _on_state(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if isinstance(message, HostState) and self.hosts.accepts_state(message):
            self.ha.host_state(message.host_id, message.online, message.reason)
            self.hosts.apply_state(message)

    def _on_inventory(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if isinstance(message, HostInventory):
            self.hosts.on_inventory(message)

    def _on_event(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if isinstance(message, MigrationProgress):
            self.migrations.on_progress(message)
        elif isinstance(message, VmEvent):
            self.vms.on_event(message)

    def _on_reply(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if not isinstance(message, Reply) or message.op_id.startswith("refresh-"):
            return  # a refresh's inventory is what matters, not its reply
        if not self.rpc.deliver(message) and not self.vms.settle_late_reply(message):
            self.rpc.keep_early(message)
