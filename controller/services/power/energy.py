"""Counting each host's energy: sampled from its BMC or its power model, saved in the store.

:class:`EnergyCounter` keeps an :class:`~controller.hardware.EnergyMeter`. Each sample reads the
BMC's DCMI power of every powered-on host that has one (a BMC that gives none is left alone for
``_DCMI_RETRY_S``), values the others by their reported power model at their telemetry CPU use, and
counts standby hosts at 0 W. The counters are restored from the store at start and saved every
``energy_save_s``, when a host is first counted, and at close. One host's bad numbers (a power
model with idle above max, a NaN) never stop the count of the others: that host is skipped, and
the reason is logged once until it changes. It may import ``controller.hardware``,
``controller.state`` and its package's ``settings``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from controller.hardware import EnergyMeter, LinearPowerModel, PowerDriver, PowerError
from controller.services.power.settings import PowerSettings
from controller.state.live import LiveState
from controller.state.store import HostRecord, Store

log = logging.getLogger(__name__)

#: How long a BMC that gave no DCMI power reading is left alone before it is asked again.
_DCMI_RETRY_S = 600.0


class EnergyCounter:
    """Each host's energy since counting began, kept across controller restarts."""

    def __init__(
        self, *, store: Store, live: LiveState, drivers: Mapping[str, PowerDriver], settings: PowerSettings
    ) -> None:
        self.store = store
        self.live = live
        self.drivers = drivers
        self.settings = settings
        self.meter = EnergyMeter(settings.energy)
        #: When counting began for each host (kept in the store with its counters).
        self.since: dict[str, float] = {}
        self._saved_at = float("-inf")
        self._dcmi_next: dict[str, float] = {}
        #: Hosts whose samples cannot be counted, and why (logged once per reason).
        self.broken: dict[str, str] = {}
        for saved in store.energy().values():
            self.meter.restore(saved.host_id, saved.joules)
            self.since[saved.host_id] = saved.since

    async def sample(self) -> None:
        """One energy sample of every host: measured by its BMC where it can, else its power model."""
        now = time.monotonic()
        hosts = self.store.hosts()
        on = [h for h in hosts if h.online and h.standby_since is None]
        readings = await asyncio.gather(*(self._reading(h, now) for h in on))
        for host, measured in zip(on, readings, strict=True):
            try:
                self._count(host, now, measured)
            except (ValueError, ArithmeticError) as exc:
                self._broken(host.host_id, str(exc))
            else:
                if self.broken.pop(host.host_id, None) is not None:
                    log.info("host %s: energy is counted again", host.host_id)
        for host in hosts:
            if host.standby_since is not None and not host.online:
                self.meter.record(host.host_id, now, powered_on=False)
        if now - self._saved_at >= self.settings.energy_save_s or self.meter.counted() - self.since.keys():
            self.save()

    def _count(self, host: HostRecord, now: float, measured: float | None) -> None:
        """Count one sample of ``host``. Raises ValueError or ArithmeticError on its bad numbers."""
        caps = host.capabilities
        if caps.power_max_w > 0:
            self.meter.set_model(host.host_id, LinearPowerModel(caps.power_idle_w, caps.power_max_w))
        telemetry = self.live.telemetry.get(host.host_id)
        cpu = telemetry.cpu_util if telemetry is not None else None
        if measured is None and (cpu is None or caps.power_max_w <= 0):
            return  # nothing to value a sample with yet (no telemetry, or no power model)
        self.meter.record(host.host_id, now, measured_w=measured, cpu_util=cpu)

    def _broken(self, host_id: str, why: str) -> None:
        if self.broken.get(host_id) != why:
            log.warning(
                "host %s: its energy is not counted: %s; fix what the host reports (its agent's power "
                "model settings); the other hosts are counted as usual",
                host_id,
                why,
            )
        self.broken[host_id] = why

    async def _reading(self, host: HostRecord, now: float) -> float | None:
        """The host's measured power (W), or None when its BMC gives none (then not asked for a while)."""
        driver = self.drivers.get(host.host_id)
        if driver is None or self._dcmi_next.get(host.host_id, 0.0) > now:
            return None
        try:
            watts = await driver.power_reading_w()
        except (PowerError, ValueError) as exc:
            log.info("host %s: no measured power: %s", host.host_id, exc)
            watts = None
        if watts is None:
            self._dcmi_next[host.host_id] = now + _DCMI_RETRY_S
        return watts

    def save(self) -> None:
        """Save every host's counters in the store."""
        counted = self.meter.joules()
        self.store.save_energy(counted)
        self._saved_at = time.monotonic()
        if counted.keys() - self.since.keys():
            self.since = {h: saved.since for h, saved in self.store.energy().items()}
