"""The one interface every power-control method implements, and the error they all raise.

A host can be switched on and off by more than one method: its BMC over IPMI
(:mod:`controller.hardware.ipmi`), a Wake-on-LAN magic packet (:mod:`controller.hardware.wol`), or, in
tests and the demo, an in-memory fake (:mod:`controller.hardware.sim`). :class:`PowerDriver` is what
they share, so :class:`controller.hardware.chain.FallbackPower` can try one after another and the
standby logic never needs to know which one it holds.

The contract every driver keeps:
- every method returns or raises within the driver's own timeout (set in its config);
- failures are :class:`PowerError`, whose message names the host, the method's target (the BMC
  address, the MAC), the reason and the fix; library and socket exceptions never escape;
- cancellation is never swallowed.

Before a host is put in standby, call :meth:`PowerDriver.verify_wake_path`: a host nobody can wake
must not be switched off to save power.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

PowerState = Literal["on", "off", "unknown"]

__all__ = ["PowerDriver", "PowerError", "PowerState", "WakeCheck"]


class PowerError(Exception):
    """A power operation failed. ``str()`` is a sentence for a person: host, target, reason, fix."""

    def __init__(self, host_id: str, method: str, target: str, action: str, reason: str, fix: str) -> None:
        self.host_id = host_id
        self.method = method
        self.target = target
        self.action = action
        self.reason = reason
        self.fix = fix
        super().__init__(f"host {host_id!r}: {action} via {method} ({target}) failed: {reason}; {fix}")


@dataclass(frozen=True, slots=True)
class WakeCheck:
    """The result of :meth:`PowerDriver.verify_wake_path`: can this method be trusted to wake the host?"""

    ok: bool
    #: The method that was checked (``ipmi``, ``wol``, ``sim``, or several joined by ``+``).
    method: str
    #: What was checked and what was not, or why the check failed; meant for a person.
    detail: str


class PowerDriver(abc.ABC):
    """Switches one host's power by one method. See the module docstring for the contract."""

    #: Short name of the method, used in messages and logs (``ipmi``, ``wol``, ``sim``...).
    method: str
    #: The host this driver switches.
    host_id: str
    #: Whether :meth:`power_off` can work at all (Wake-on-LAN, for one, cannot power off).
    can_power_off: bool = True
    #: Whether :meth:`power_on` can wake the host from standby (a BMC can; so can WoL).
    can_wake: bool = True

    @abc.abstractmethod
    async def status(self) -> PowerState:
        """The host's power state; ``unknown`` when this method cannot observe it at all.

        Raises:
            PowerError: the method could observe the state but the query failed.
        """

    @abc.abstractmethod
    async def power_on(self) -> None:
        """Switch the host on (a no-op when it already is).

        Raises:
            PowerError: the request failed, or was not confirmed within the driver's timeout.
        """

    @abc.abstractmethod
    async def power_off(self, soft: bool = False) -> None:
        """Switch the host off: at once, or with ``soft=True`` by asking its OS to shut down first.

        Raises:
            PowerError: this method cannot power off, or the request failed or was not confirmed.
        """

    @abc.abstractmethod
    async def verify_wake_path(self) -> WakeCheck:
        """Check, without changing the host's power, that :meth:`power_on` would be able to act.

        Never raises for a failed check (that is ``ok=False`` with the reason in ``detail``).
        """

    async def power_reading_w(self) -> float | None:
        """The host's current draw in watts as measured by its hardware, or None if it cannot say.

        Raises:
            PowerError: the method can measure, but the query failed.
        """
        return None

    def fail(self, target: str, action: str, reason: str, fix: str) -> PowerError:
        """A :class:`PowerError` for this driver's host and method (to raise)."""
        return PowerError(self.host_id, self.method, target, action, reason, fix)
