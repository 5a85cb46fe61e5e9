"""What an operator sees of a host's power, and the power actions an operator asks for.

:class:`OperatorPower` reads a host's power state, methods and energy (:meth:`~OperatorPower.host_power`),
asks its methods what they read now (:meth:`~OperatorPower.host_status`), and powers a host on or puts
it in standby (:meth:`~OperatorPower.host_action`) through the same drivers and checks as the
service's own rounds, under the same lock. Refusals are domain errors with stable codes. It may
import ``controller.services.hosts``, ``controller.hardware``, ``controller.state``,
``controller.common`` and its package's ``actions``, ``energy``, ``settings`` and ``tracking``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from controller.common.errors import Conflict, HardwareFailed
from controller.hardware import PowerDriver, PowerError
from controller.services.hosts import HostService
from controller.services.power.actions import PowerActions
from controller.services.power.energy import EnergyCounter
from controller.services.power.settings import PowerSettings
from controller.services.power.tracking import PowerTracking
from controller.state.store import HostRecord, Store
from protocols.rest import HostPower, HostPowerReport, StepResult, WakeCheckView


class OperatorPower:
    """An operator's view of and requests for one host's power."""

    def __init__(
        self,
        *,
        store: Store,
        hosts: HostService,
        tracking: PowerTracking,
        actions: PowerActions,
        energy: EnergyCounter,
        lock: asyncio.Lock,
        settings: PowerSettings,
    ) -> None:
        self.store = store
        self.hosts = hosts
        self.tracking = tracking
        self.actions = actions
        self.energy = energy
        #: Held while a plan, an apply or an operator's power action is carried out.
        self.lock = lock
        self.settings = settings

    def host_power(self, host_id: str, record: HostRecord | None = None) -> HostPower:
        """The host's power state, methods and energy (``record``: the host's store row, if at hand)."""
        host = record if record is not None else self.store.host(host_id)
        since = host.standby_since if host is not None else None
        state: Literal["on", "standby", "powering-on"] = "on"
        if since is not None:
            state = "powering-on" if host_id in self.tracking.powering_on else "standby"
        driver = self.tracking.drivers.get(host_id)
        meter = self.energy.meter
        return HostPower(
            host_id=host_id,
            state=state,
            method=driver.method if driver is not None else None,
            standby_since=since,
            energy_kwh=round(meter.kwh(host_id), 6),
            energy_source=meter.source(host_id),
            energy_since=self.energy.since.get(host_id),
        )

    def _require_driver(self, host_id: str) -> PowerDriver:
        self.hosts.require(host_id)
        driver = self.tracking.drivers.get(host_id)
        if driver is None:
            raise Conflict(
                "no_power_method",
                f"host {host_id!r} has no power method: neither a BMC (controller --bmc-config) nor "
                "Wake-on-LAN (controller --wol-config) is configured for it; add one and restart the controller",
            )
        return driver

    async def host_status(self, host_id: str) -> HostPowerReport:
        """What the host's power methods read now, and whether its wake path verifies.

        Raises:
            NotFound: unknown host. Conflict: no power method configured for it.
        """
        driver = self._require_driver(host_id)
        try:
            status: str = await driver.status()
            detail = f"read via {driver.method}"
        except PowerError as exc:
            status, detail = "unknown", str(exc)
        check = await driver.verify_wake_path()
        return HostPowerReport(
            host_id=host_id,
            action="status",
            status=status,
            power=self.host_power(host_id),
            detail=detail,
            wake_check=WakeCheckView(ok=check.ok, method=check.method, detail=check.detail),
        )

    async def host_action(self, host_id: str, action: Literal["on", "off"]) -> HostPowerReport:
        """An operator's power action, through the same drivers and checks as the service's own.

        ``off`` puts an empty host in standby (its wake path verified first); ``on`` powers a host on
        and keeps the service from putting it back in standby for ``operator_hold_s``.

        Raises:
            NotFound: unknown host. Conflict: no power method, the host is not empty, or its wake path
                does not verify. HardwareFailed: the power methods failed (an alert names each one's error).
        """
        driver = self._require_driver(host_id)
        async with self.lock:
            if action == "off":
                result = await self._off(host_id, driver)
            else:
                result = await self._on(host_id, driver)
        try:
            status: str = await driver.status()
        except PowerError:
            status = "unknown"
        return HostPowerReport(
            host_id=host_id,
            action=action,
            status=status,
            power=self.host_power(host_id),
            detail=result.detail,
        )

    async def _off(self, host_id: str, driver: PowerDriver) -> StepResult:
        host = self.hosts.require(host_id)
        if host.standby_since is not None:
            return StepResult(kind="standby", subject=host_id, ok=True, detail="already in standby")
        if not (driver.can_power_off and driver.can_wake):
            raise Conflict(
                "cannot_standby",
                f"host {host_id!r}: its power method {driver.method} cannot both power it off and wake it; "
                "configure its BMC (--bmc-config)",
            )
        used = self.store.usage().get(host_id)
        if used is not None and used.vms:
            names = ", ".join(vm.name for vm in self.store.vms(host_id)) or f"{used.vms} incoming"
            raise Conflict(
                "host_not_empty",
                f"host {host_id!r} still holds {used.vms} VM(s) ({names}); move them first with "
                f"`fleetvisor host evacuate {host_id}`, then power it off",
            )
        self.tracking.held.pop(host_id, None)
        result = await self.actions.standby(host_id, f"{host_id} standby: requested by an operator")
        if result.ok:
            return result
        if result.code == "wake_path_unverified":
            raise Conflict("wake_path_unverified", result.detail + "; fix the wake path, then retry")
        if result.code == "standby_skipped":
            raise Conflict("host_not_empty", f"host {host_id!r}: {result.detail}")
        raise HardwareFailed("power_failed", result.detail)

    async def _on(self, host_id: str, driver: PowerDriver) -> StepResult:
        host = self.hosts.require(host_id)
        if not driver.can_wake:
            raise Conflict(
                "cannot_wake", f"host {host_id!r}: its power method {driver.method} cannot wake it"
            )
        self.tracking.held[host_id] = time.monotonic() + self.settings.operator_hold_s
        if host.online and host.standby_since is None:
            return StepResult(kind="power_on", subject=host_id, ok=True, detail="already on")
        result = await self.actions.power_on(host_id, f"power on {host_id}: requested by an operator")
        if not result.ok:
            raise HardwareFailed("power_failed", result.detail)
        return result
