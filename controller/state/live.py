"""What the hosts said last: their telemetry and inventories, kept in memory for views and decisions.

The intake layer writes it; services and views read it. It holds no task and no bus.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from protocols.messages import HostInventory, HostTelemetry


class LiveState:
    """The latest telemetry and inventory of each host, and the agent run each belongs to."""

    def __init__(self) -> None:
        self.telemetry: dict[str, HostTelemetry] = {}
        #: When each host's telemetry last arrived (monotonic seconds).
        self.telemetry_seen: dict[str, float] = {}
        self.telemetry_count = 0
        #: The latest inventory each host reported: what it says it runs, for views and invariant checks.
        self.inventories: dict[str, HostInventory] = {}
        #: The boot id of each host's current agent run (from its online state or its inventory).
        self.boot_ids: dict[str, str] = {}

    def record_telemetry(self, message: HostTelemetry) -> None:
        """Keep ``message`` as its host's latest telemetry."""
        self.telemetry[message.host_id] = message
        self.telemetry_seen[message.host_id] = time.monotonic()
        self.telemetry_count += 1

    def vm_dirty_rate(self, host_id: str, vm: str) -> float | None:
        """``vm``'s dirty rate in its host's latest telemetry, or None when the host has not reported it."""
        telemetry = self.telemetry.get(host_id)
        if telemetry is not None:
            for status in telemetry.vms:
                if status.name == vm:
                    return status.dirty_mib_s
        return None

    def is_stale(self, message: HostInventory) -> bool:
        """Whether ``message`` describes its host as it was before the inventory already kept.

        Within one agent run the sequence number orders inventories; across runs (a new ``boot_id``)
        the host's own clock does.
        """
        newest = self.inventories.get(message.host_id)
        if newest is None:
            return False
        if message.boot_id == newest.boot_id:
            return message.seq < newest.seq
        return message.ts < newest.ts


class StandbyHosts:
    """Hosts switched off on purpose (standby). The power service is the only writer; HA reads it."""

    def __init__(self) -> None:
        self._hosts: set[str] = set()

    def __contains__(self, host_id: object) -> bool:
        return host_id in self._hosts

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._hosts))

    def __len__(self) -> int:
        return len(self._hosts)

    def add(self, host_id: str) -> None:
        """Mark ``host_id`` as in standby (power service only)."""
        self._hosts.add(host_id)

    def discard(self, host_id: str) -> None:
        """Mark ``host_id`` as no longer in standby (power service only)."""
        self._hosts.discard(host_id)
