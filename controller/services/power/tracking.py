"""What the power service remembers between rounds about each host and VM, shared by its parts.

One small mutable object, :class:`PowerTracking`, handed to the parts that read or change it (the
round's observation, the planner, the actions, the operator's requests), so none of them holds the
service itself. It also answers the few questions every part asks of a host's power methods. It
imports only ``controller.hardware``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.hardware import PowerDriver


@dataclass(slots=True)
class PowerTracking:
    """Per-host power bookkeeping and per-VM load history (all in memory; the store keeps standby)."""

    #: Each host's power methods (fixed for the controller's lifetime).
    drivers: Mapping[str, PowerDriver]
    #: Per-VM CPU samples (one per round, newest first), at most ``history`` each.
    history: dict[str, deque[float]] = field(default_factory=dict)
    #: Fleet-wide demand (MIPS) per round, newest first; its length is set by the service.
    demand: deque[float] = field(default_factory=deque)
    #: Rounds each host has been on and empty.
    empty_rounds: dict[str, int] = field(default_factory=dict)
    #: The agent boot each standby host had when it went to standby ("" when none is known).
    standby_boot: dict[str, str] = field(default_factory=dict)
    #: Standby hosts powered on whose agent has not reported in yet: since when (monotonic), by which method.
    powering_on: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: Hosts being powered off right now (their agent may still report in meanwhile).
    powering_off: set[str] = field(default_factory=set)
    #: Hosts whose power-on failed, and when (monotonic) they may be tried again.
    wake_failed: dict[str, float] = field(default_factory=dict)
    #: Hosts an operator powered on, and until when (monotonic) they are kept out of standby.
    held: dict[str, float] = field(default_factory=dict)
    #: Hosts whose refused standby (wake path unverified) was announced already.
    refused: set[str] = field(default_factory=set)

    def can_wake(self, host_id: str) -> bool:
        """Whether one of the host's methods can power it on."""
        driver = self.drivers.get(host_id)
        return driver is not None and driver.can_wake

    def can_standby(self, host_id: str) -> bool:
        """Whether the host's methods can both power it off and wake it again."""
        driver = self.drivers.get(host_id)
        return driver is not None and driver.can_wake and driver.can_power_off
