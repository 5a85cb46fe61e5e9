"""Enrolment: which host ids may join the fleet, and when a known host must be accepted again.

With ``enrolment="operator"`` (the default) a new host id is *pending*: the controller records what
it claims (address, capacity) but reconciles nothing of it (no VM adopted, no capacity for the
scheduler, no placement, no HA) until an operator runs ``fleetvisor host accept H`` or the host
presents a one-time join token (``fleetvisor host join-token``). An accepted host whose capacity
changes beyond ``capacity_factor`` (up or down, in cores or memory) against its accepted record is
pending again: an inventory that claims a machine many times larger is not believed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from controller.common.errors import Conflict, NotFound
from controller.state.enrolment import EnrolmentRecord, EnrolmentTable, JoinToken
from controller.state.events import EventHub
from controller.state.store import Store
from protocols.messages import HostInventory

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HostSettings:
    """How hosts join the fleet."""

    #: ``operator``: a new host id is pending until an operator accepts it (``host accept``) or it
    #: presents a one-time join token. ``open``: any host id that reaches the bus joins.
    enrolment: Literal["operator", "open"] = "operator"
    #: A capacity (cores or memory) more than this factor above or below the accepted one makes an
    #: enrolled host pending again.
    capacity_factor: float = 2.0


def _beyond(old: int, new: int, factor: float) -> bool:
    return new > old * factor or new * factor < old


class Enrolment:
    """Decides whether a host's inventory may be reconciled, and keeps the pending ones."""

    def __init__(self, store: Store, events: EventHub, settings: HostSettings) -> None:
        self.table = EnrolmentTable(store)
        self.store = store
        self.events = events
        self.settings = settings
        #: The newest inventory of each pending host: what ``accept`` reconciles at once.
        self.held: dict[str, HostInventory] = {}

    def is_pending(self, host_id: str) -> bool:
        record = self.table.get(host_id)
        return record is not None and record.state == "pending"

    def pending(self) -> list[EnrolmentRecord]:
        return self.table.pending()

    def admit(self, message: HostInventory) -> bool:
        """Whether ``message`` may be reconciled; a host it does not admit is (or becomes) pending."""
        host_id, caps = message.host_id, message.capabilities
        record = self.table.get(host_id)
        if record is None or record.state == "pending":
            # A host id known from before enrolment existed, or any new id under open enrolment, joins;
            # a host made pending again (its capacity) waits for an operator even then.
            known = record is None and self.store.host(host_id) is not None
            if record is None and (known or self.settings.enrolment == "open"):
                self._accept(message, "known before enrolment" if known else "open enrolment")
                return True
            why = "no join token" if not message.join_token else None
            if why is None:
                why = self.table.consume_token(message.join_token, host_id)
                if why is None:
                    self._accept(message, "join token")
                    self.events.emit(
                        "host.enrolled", f"host {host_id} enrolled with a join token", host_id=host_id
                    )
                    return True
            self._hold(message, record, f"new host id ({why})")
            return False
        if _beyond(record.cores, caps.cores, self.settings.capacity_factor) or _beyond(
            record.memory_mib, caps.memory_mib, self.settings.capacity_factor
        ):
            change = (
                f"its capacity changed from {record.cores} cores, {record.memory_mib} MiB to "
                f"{caps.cores} cores, {caps.memory_mib} MiB (beyond {self.settings.capacity_factor:g}x)"
            )
            self._hold(message, None, change)
            return False
        return True

    def _hold(self, message: HostInventory, record: EnrolmentRecord | None, why: str) -> None:
        """Record ``message``'s host as pending; say so (once per agent run) with the fix."""
        host_id, caps = message.host_id, message.capabilities
        self.held[host_id] = message
        if record is not None and record.boot_id == message.boot_id:
            return  # said already for this agent run
        self.table.put(
            host_id, "pending", boot_id=message.boot_id, address=message.address,
            cores=caps.cores, memory_mib=caps.memory_mib, reason=why,
        )  # fmt: skip
        text = (
            f"host {host_id} at {message.address} is pending: {why}; nothing of it is used until an "
            f"operator runs `fleetvisor host accept {host_id}` (or it joins with a token from "
            f"`fleetvisor host join-token --host {host_id}`)"
        )
        log.warning("%s", text)
        self.events.emit("host.pending", text, host_id=host_id)

    def _accept(self, message: HostInventory, how: str) -> None:
        caps = message.capabilities
        self.held.pop(message.host_id, None)
        self.table.put(
            message.host_id, "accepted", boot_id=message.boot_id, address=message.address,
            cores=caps.cores, memory_mib=caps.memory_mib, reason=how,
        )  # fmt: skip

    def accept(self, host_id: str) -> HostInventory | None:
        """An operator accepts pending ``host_id``; returns its newest inventory, to reconcile now.

        Raises:
            NotFound: ``host_id`` is not pending (the message names those that are).
        """
        record = self.table.get(host_id)
        if record is None or record.state != "pending":
            waiting = ", ".join(r.host_id for r in self.table.pending()) or "none"
            state = "already accepted" if record is not None or self.store.host(host_id) else "not known"
            raise NotFound(
                "not_pending",
                f"host {host_id!r} is not pending ({state}); pending hosts: {waiting} "
                "(`fleetvisor host list --pending`)",
            )
        message = self.held.get(host_id)
        if message is not None:
            self._accept(message, "accepted by an operator")
        else:
            self.table.put(
                host_id, "accepted", boot_id=record.boot_id, address=record.address,
                cores=record.cores, memory_mib=record.memory_mib, reason="accepted by an operator",
            )  # fmt: skip
        self.events.emit(
            "host.accepted",
            f"host {host_id} accepted by an operator ({record.cores} cores, {record.memory_mib} MiB)",
            host_id=host_id,
        )
        return message

    def forget(self, host_id: str) -> bool:
        """Drop ``host_id``'s enrolment; returns whether it was pending."""
        pending = self.is_pending(host_id)
        self.table.delete(host_id)
        self.held.pop(host_id, None)
        return pending

    def create_token(self, host_id: str, ttl_s: float) -> JoinToken:
        """A one-time join token (for ``host_id`` only, unless empty), valid for ``ttl_s`` seconds.

        Raises:
            Conflict: ``host_id`` is enrolled already.
        """
        record = self.table.get(host_id) if host_id else None
        if record is not None and record.state == "accepted":
            raise Conflict("host_enrolled", f"host {host_id!r} is enrolled already; it needs no join token")
        token = self.table.create_token(host_id, ttl_s)
        self.events.emit(
            "host.join_token",
            "join token created"
            + (f" for host {host_id}" if host_id else " (any new host id)")
            + f", valid for {ttl_s:g}s",
            host_id=host_id,
        )
        return token
