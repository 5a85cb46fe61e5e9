"""Marking a host as in standby, and back: the store, the scheduler and HA's view move together.

A host in standby is marked in the store (it survives a controller restart), in the scheduler's
state (not placeable) and in :class:`~controller.state.live.StandbyHosts` (HA leaves it alone);
:class:`StandbyMarks` is the only writer of the last. It may import ``controller.state``,
``controller.scheduler`` and its package's ``tracking``.
"""

from __future__ import annotations

import logging
import time

from controller.scheduler import FleetState, FleetStateError
from controller.services.power.tracking import PowerTracking
from controller.state.events import EventHub
from controller.state.live import LiveState, StandbyHosts
from controller.state.store import Store

log = logging.getLogger(__name__)


class StandbyMarks:
    """Puts hosts in standby and takes them out, everywhere the controller keeps it."""

    def __init__(
        self,
        *,
        store: Store,
        events: EventHub,
        live: LiveState,
        fleet_state: FleetState,
        standby: StandbyHosts,
        tracking: PowerTracking,
    ) -> None:
        self.store = store
        self.events = events
        self.live = live
        self.fleet_state = fleet_state
        self.standby = standby
        self.tracking = tracking

    def mark(self, host_id: str) -> None:
        """Mark ``host_id`` standby now, remembering its agent's current boot."""
        inventory = self.live.inventories.get(host_id)
        host = self.store.host(host_id)
        boot = inventory.boot_id if inventory is not None else (host.boot_id if host is not None else "")
        with self.store.transaction():
            self.store.set_host_standby(host_id, time.time())
        self.enter(host_id, boot)

    def enter(self, host_id: str, boot_id: str) -> None:
        """Treat ``host_id`` as in standby (already so in the store) since agent boot ``boot_id``."""
        self.tracking.standby_boot[host_id] = boot_id
        self.standby.add(host_id)
        try:
            self.fleet_state.set_powered_on(host_id, False)
        except FleetStateError:
            log.warning("host %s is in standby but not in the scheduler's state", host_id)

    def unmark(self, host_id: str) -> None:
        """Take ``host_id`` out of standby: it is on and placeable again."""
        with self.store.transaction():
            self.store.set_host_standby(host_id, None)
        tracking = self.tracking
        tracking.standby_boot.pop(host_id, None)
        tracking.powering_on.pop(host_id, None)
        self.standby.discard(host_id)
        tracking.empty_rounds[host_id] = 0
        try:
            self.fleet_state.set_powered_on(host_id, True)
        except FleetStateError:
            log.warning("host %s left standby but is not in the scheduler's state", host_id)

    def leave(self, host_id: str) -> None:
        """A standby host's agent reported in with a new boot: the host is on and takes VMs again."""
        started = self.tracking.powering_on.get(host_id)
        self.unmark(host_id)
        self.tracking.wake_failed.pop(host_id, None)
        if started is not None:
            message = (
                f"host {host_id} is on: its agent reported in {time.monotonic() - started[0]:.1f}s after the "
                f"power-on via {started[1]}; it takes VMs again"
            )
        else:
            message = f"host {host_id} came back on outside the power manager; it takes VMs again"
        self.events.emit("power.on", message, host_id=host_id)
