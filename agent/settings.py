"""What an agent is told at start: its host id, its broker, and how it speaks for its host."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class AgentSettings:
    host_id: str
    broker_url: str
    state_dir: pathlib.Path | None = None
    telemetry_interval_s: float = 1.0
    #: Address other hosts use to reach this one (the migration data path).
    address: str = "127.0.0.1"
    username: str | None = None
    password: str | None = None
    #: Commands waiting per VM before new ones are refused as busy.
    max_queued_per_vm: int = 64
    #: Coalesce inventory updates: at most one publication per this many seconds.
    inventory_debounce_s: float = 0.1
    #: HA lease: after this long without the bus, HA VMs are destroyed (self-fencing), because the
    #: controller may restart them elsewhere. Must match the controller's lease. None disables it.
    ha_lease_s: float | None = None
    #: Labels this host reports (zone, rack, ...); the scheduler's label filter matches on them.
    labels: dict[str, str] = field(default_factory=dict)
    bus_overrides: dict[str, Any] = field(default_factory=dict)
    #: A one-time join token (``agent --join-token``, from ``fleetvisor host join-token``): it enrols
    #: a new host id without an operator's ``host accept``. Sent in every inventory; once the host
    #: is enrolled the controller ignores it (it was spent on first use).
    join_token: str = ""
