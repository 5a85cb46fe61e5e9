"""Host use cases: what hosts say of themselves (online state, inventory) and what operators set
(labels, maintenance).

An inventory is first judged by :class:`~controller.services.enrolment.Enrolment`: the inventory of a
pending host is held, not reconciled. Each admitted inventory is reconciled into the store
(:func:`controller.state.reconcile.reconcile`); the scheduler's claims follow the VMs it adopted, and
the stale copies it found go to :class:`~controller.services.cleanup.StaleCopies`.
"""

from __future__ import annotations

import logging
import time
import uuid

from controller.common.errors import Conflict, NotFound
from controller.scheduler import FleetState
from controller.services.agent_rpc import AgentRpc
from controller.services.cleanup import StaleCopies
from controller.services.duplicates import DuplicateAgents
from controller.services.enrolment import Enrolment, HostSettings
from controller.state.events import EventHub
from controller.state.live import LiveState
from controller.state.reconcile import reconcile
from controller.state.store import HostRecord, Store
from protocols.messages import HostInventory, HostState, RefreshInventory

log = logging.getLogger(__name__)


__all__ = ["HostService", "HostSettings"]


class HostService:
    """Keeps host records true to what agents report, and applies operators' host settings."""

    def __init__(
        self,
        store: Store,
        events: EventHub,
        live: LiveState,
        fleet_state: FleetState,
        rpc: AgentRpc,
        stale: StaleCopies,
        settings: HostSettings | None = None,
    ) -> None:
        self.settings = settings or HostSettings()
        self.store = store
        self.events = events
        self.live = live
        self.fleet_state = fleet_state
        self.rpc = rpc
        self.stale = stale
        self.enrolment = Enrolment(store, events, self.settings)
        self.duplicates = DuplicateAgents(rpc, events)

    async def close(self) -> None:
        await self.duplicates.close()

    def require(self, host_id: str) -> HostRecord:
        """The record of host ``host_id``.

        Raises:
            NotFound: no such host.
        """
        record = self.store.host(host_id)
        if record is None:
            raise NotFound(
                "unknown_host", f"host {host_id!r} is not known; list hosts with `fleetvisor host list`"
            )
        return record

    def online_count(self) -> int:
        """How many hosts are online."""
        return sum(1 for host in self.store.hosts() if host.online)

    # -- what hosts report ------------------------------------------------------------------------

    def accepts_state(self, message: HostState) -> bool:
        """Whether ``message`` is news about a known host (and not a stale offline of an earlier run)."""
        known_boot = self.live.boot_ids.get(message.host_id)
        if not message.online and known_boot is not None and message.boot_id != known_boot:
            log.info("ignoring a stale offline state of %s from an earlier agent run", message.host_id)
            return False
        if message.online:
            if not self.duplicates.online(message.host_id, message.boot_id):
                self.live.boot_ids[message.host_id] = self.duplicates.kept(message.host_id) or ""
                return False  # a second live agent with this host id, refused
            self.live.boot_ids[message.host_id] = message.boot_id
        # The inventory (hello) creates the host; it follows the online state. A pending host has none.
        return self.store.host(message.host_id) is not None and not self.enrolment.is_pending(message.host_id)

    def apply_state(self, message: HostState) -> None:
        """Record that a known host went online or offline (after :meth:`accepts_state`)."""
        host_id = message.host_id
        self.fleet_state.set_online(host_id, message.online)
        if message.online:
            self._back(host_id)
        if self.store.set_host_online(host_id, message.online, message.reason):
            if message.online:
                self.events.emit(
                    "host.online", f"host {host_id} is online ({message.reason})", host_id=host_id
                )
            else:
                self.live.telemetry.pop(host_id, None)
                self.events.emit(
                    "host.offline", f"host {host_id} is offline ({message.reason})", host_id=host_id
                )
        self.rpc.set_online(host_id, message.online)

    def on_inventory(self, message: HostInventory) -> None:
        """Reconcile a host's inventory, unless a newer one was handled already."""
        if not self.duplicates.believes(message.host_id, message.boot_id):
            return  # the inventory of a refused second agent
        if self.live.is_stale(message):
            # A QoS 1 retry or a restored retained copy overtook a newer picture; applying it would
            # mark VMs created since as missing.
            newest = self.live.inventories[message.host_id]
            log.info(
                "host %s: ignoring inventory #%d (%s): #%d from %s is newer",
                message.host_id, message.seq, message.boot_id[:8], newest.seq, newest.boot_id[:8],
            )  # fmt: skip
            return
        if not self.enrolment.admit(message):
            self._hold(message.host_id)
            return
        self._reconcile(message)

    def _reconcile(self, message: HostInventory) -> None:
        self.live.inventories[message.host_id] = message
        self.live.boot_ids[message.host_id] = message.boot_id
        self._back(message.host_id)
        done = reconcile(self.store, self.events, message)
        host = self.store.host(message.host_id)
        assert host is not None
        self.fleet_state.upsert_host(host, host.labels)
        for name in done.adopted:
            found = self.store.vm(name)
            if found is not None and found.host_id is not None:
                spec = found.spec
                self.fleet_state.adopt(name, found.host_id, spec.vcpus, spec.memory_mib, spec.disk_gib)
        for name in done.deleted:
            self.fleet_state.release(name)
        for copy in done.stale:
            self.stale.remove(copy)
        self.rpc.set_online(message.host_id, True)

    def _hold(self, host_id: str) -> None:
        """A known host became pending (its capacity): nothing more is placed on it until accepted."""
        self.live.inventories.pop(host_id, None)
        if self.store.host(host_id) is None:
            return
        self.store.set_host_online(host_id, False, "pending: accept it with `fleetvisor host accept`")
        if host_id in self.fleet_state.index:
            self.fleet_state.set_online(host_id, False)
        self.rpc.set_online(host_id, False)

    async def accept(self, host_id: str) -> None:
        """An operator accepts pending ``host_id``: its newest inventory is reconciled now, and the host
        is asked for a fresh one.

        Raises:
            NotFound: ``host_id`` is not pending.
        """
        held = self.enrolment.accept(host_id)
        if held is not None:
            self._reconcile(held)
            if host_id in self.fleet_state.index:
                self.fleet_state.set_online(host_id, True)
        command = RefreshInventory(op_id=f"refresh-{uuid.uuid4().hex}", deadline=time.time() + 30)
        await self.rpc.send(host_id, command, expiry_s=30)

    async def refresh_inventories(self, first: bool) -> None:
        """After every (re)connect, ask each known host for its full inventory (anti-entropy).

        Retained inventories already arrive on subscribe, but they only reflect the last change the
        agent noticed itself; this closes the gap for anything that changed while we were away.
        """
        drifted = self.fleet_state.resync(self.store.usage())
        if drifted:
            log.warning("scheduler state drifted from the store on %s; resynchronised", ", ".join(drifted))
        deadline = time.time() + 30
        for host in self.store.hosts():
            command = RefreshInventory(op_id=f"refresh-{uuid.uuid4().hex}", deadline=deadline)
            await self.rpc.send(host.host_id, command, expiry_s=30)

    def _check_ha_room(self, host_id: str) -> None:
        """Raise Conflict when ``host_id`` is the last host that could hold the fleet's HA VMs."""
        ha_vms = [vm.name for vm in self.store.vms() if vm.spec.ha]
        if not ha_vms:
            return
        others = [
            h.host_id
            for h in self.store.hosts()
            if h.host_id != host_id and h.online and not h.maintenance and h.standby_since is None
        ]
        if not others:
            raise Conflict(
                "last_ha_host",
                f"host {host_id!r} is the last host that can run the fleet's {len(ha_vms)} HA VM(s) "
                f"({', '.join(ha_vms[:5])}{'...' if len(ha_vms) > 5 else ''}); in maintenance they would have "
                "nowhere to restart. Bring another host online first, or repeat with --force",
            )

    def _back(self, host_id: str) -> None:
        """A fenced host speaks again: it is no longer fenced (its VMs were restarted elsewhere, and the
        stale copies it still reports are cleaned up by reconciliation).
        """
        host = self.store.host(host_id)
        if host is not None and host.fenced_at is not None:
            self.store.set_host_fenced(host_id, None)
            self.events.emit(
                "host.unfenced", f"host {host_id} is back; it is no longer fenced", host_id=host_id
            )

    # -- what operators set -----------------------------------------------------------------------

    def forget(self, host_id: str) -> list[str]:
        """Remove a host that is gone for good, with the records of the VMs it held. Returns those VMs.

        Raises:
            NotFound: an unknown host. Conflict: the host is online (stop its agent first).
        """
        if self.store.host(host_id) is None and self.enrolment.forget(host_id):
            self.events.emit(
                "host.forgotten", f"pending host {host_id} forgotten by an operator", host_id=host_id
            )
            return []
        host = self.require(host_id)
        if host.online:
            raise Conflict(
                "host_online",
                f"host {host_id!r} is online; forget is for a host that is gone for good: stop its agent "
                f"(and move its VMs with `fleetvisor host evacuate {host_id}`) first",
            )
        gone = [vm.name for vm in self.store.vms(host_id)]
        with self.store.transaction():
            for name in gone:
                self.store.delete_vm(name)
            self.store.delete_host(host_id)
        for name in gone:
            self.fleet_state.release(name)
        self.fleet_state.remove_host(host_id)
        self.live.telemetry.pop(host_id, None)
        self.live.inventories.pop(host_id, None)
        self.enrolment.forget(host_id)
        self.duplicates.forget(host_id)
        self.events.emit(
            "host.forgotten",
            f"host {host_id} forgotten by an operator"
            + (f"; records removed: {', '.join(gone)}" if gone else ""),
            host_id=host_id,
        )
        return gone

    def update(
        self,
        host_id: str,
        *,
        labels: dict[str, str | None] | None = None,
        maintenance: bool | None = None,
        force: bool = False,
    ) -> HostRecord:
        """Set operator labels (a None value removes one) and maintenance mode.

        Raises:
            NotFound: an unknown host. Conflict: maintenance would drain the last host that can hold
                the fleet's HA VMs (unless ``force``).
        """
        host = self.require(host_id)
        if maintenance and not host.maintenance and not force:
            self._check_ha_room(host_id)
        operator_labels = None
        if labels is not None:
            operator_labels = {k: v for k, v in {**host.operator_labels, **labels}.items() if v is not None}
        with self.store.transaction():
            self.store.set_host_admin(host_id, maintenance=maintenance, operator_labels=operator_labels)
        updated = self.require(host_id)
        self.fleet_state.upsert_host(updated, updated.labels)
        if maintenance is not None and maintenance != host.maintenance:
            self.fleet_state.set_maintenance(host_id, maintenance)
            what = "enters maintenance: no new VMs are placed there" if maintenance else "leaves maintenance"
            self.events.emit("host.maintenance", f"host {host_id} {what}", host_id=host_id)
        if operator_labels is not None and operator_labels != host.operator_labels:
            shown = ", ".join(f"{k}={v}" for k, v in sorted(updated.labels.items())) or "none"
            self.events.emit("host.labels", f"host {host_id} labels: {shown}", host_id=host_id)
        return updated
