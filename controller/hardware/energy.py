"""Energy per host: watts samples integrated into kWh, measured where the hardware can say.

"Count energy per host: measured watts from the BMC where available (DCMI power reading), the host's
power model otherwise." Each sample is valued in this order:
1. ``measured_w``, the BMC's reading (:meth:`PowerDriver.power_reading_w`), when there is one;
2. ``standby_w`` (a setting) when the host is known to be off;
3. the host's power model at its CPU utilisation: ``idle + (max - idle) * cpu_util`` for a
   :class:`LinearPowerModel`, or any object with ``power(utilization) -> watts``, such as the
   balancer's SPECpower tables.

Between two samples of a host the energy is the trapezoid under them, and each half is counted
against the source of its own sample, so ``kwh_by_source`` says how much of the total was measured.
Nothing is invented across a hole: an interval longer than ``max_gap_s`` (lost telemetry) is skipped
and counted in ``gaps``; a sample that cannot be valued ends the interval too,
and one older than the last is dropped and counted. Memory is one small record per host. The
totals can be saved (:meth:`EnergyMeter.joules`) and restored (:meth:`EnergyMeter.restore`): a
restarted controller goes on counting, and the time it was down is a hole too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

from controller.hardware.driver import PowerDriver, PowerError

__all__ = [
    "EnergyMeter",
    "EnergySettings",
    "EnergySource",
    "HostEnergy",
    "HostPowerModel",
    "LinearPowerModel",
]

log = logging.getLogger(__name__)

EnergySource = Literal["measured", "model", "standby"]
_SOURCES: frozenset[str] = frozenset(get_args(EnergySource))
_JOULES_PER_KWH = 3_600_000.0
#: No single host draws more than this; a larger measurement is treated as none.
_MAX_PLAUSIBLE_W = 1_000_000.0


class HostPowerModel(Protocol):
    def power(self, utilization: float, /) -> float:
        """Watts drawn by a host that is on, at CPU ``utilization`` (0..1)."""
        ...


@dataclass(frozen=True, slots=True)
class LinearPowerModel:
    """Power rising linearly from idle to full load, as the agents report it (``power_idle_w``,
    ``power_max_w`` in the host's capabilities).
    """

    idle_w: float
    max_w: float

    def __post_init__(self) -> None:
        if not 0 <= self.idle_w <= self.max_w <= _MAX_PLAUSIBLE_W:
            raise ValueError(
                f"power model: need 0 <= idle_w <= max_w <= {_MAX_PLAUSIBLE_W:g}, "
                f"got idle {self.idle_w}, max {self.max_w}"
            )

    def power(self, utilization: float, /) -> float:
        """Watts at ``utilization``, clipped to 0..1."""
        return self.idle_w + (self.max_w - self.idle_w) * min(1.0, max(0.0, utilization))


@dataclass(frozen=True, slots=True)
class EnergySettings:
    #: An interval longer than this between two samples of a host is not counted.
    max_gap_s: float = 300.0
    #: Draw of a host that is off (standby) when no measurement says otherwise.
    standby_w: float = 0.0


@dataclass(frozen=True, slots=True)
class HostEnergy:
    """What the meter knows about one host."""

    host_id: str
    kwh: float
    kwh_by_source: dict[EnergySource, float]
    #: The source of the latest valued sample (None before the first).
    source: EnergySource | None
    samples: int
    #: Intervals not counted because they were longer than ``max_gap_s`` or had an unvalued end.
    gaps: int
    #: Samples dropped: older than the latest, or with neither a measurement nor a model to value them.
    dropped: int


@dataclass(slots=True)
class _Host:
    model: HostPowerModel | None = None
    last_ts: float | None = None
    last_w: float | None = None
    last_source: EnergySource | None = None
    joules: dict[EnergySource, float] = field(default_factory=dict)
    samples: int = 0
    gaps: int = 0
    dropped: int = 0
    warned: bool = False


class EnergyMeter:
    """Per-host kWh from watts samples. See the module docstring for how samples are valued."""

    def __init__(self, settings: EnergySettings | None = None) -> None:
        self.settings = settings if settings is not None else EnergySettings()
        self._hosts: dict[str, _Host] = {}

    def set_model(self, host_id: str, model: HostPowerModel) -> None:
        """The power model that values this host's samples when nothing is measured."""
        self._hosts.setdefault(host_id, _Host()).model = model

    def restore(self, host_id: str, joules: Mapping[str, float]) -> None:
        """Start ``host_id``'s counters from saved totals (a restarted controller). The interval
        across the restart is a hole: nothing is counted for it.
        """
        host = self._hosts.setdefault(host_id, _Host())
        for source, value in joules.items():
            if source in _SOURCES and math.isfinite(value) and value >= 0:
                host.joules[source] = value  # type: ignore[index]  # checked against _SOURCES

    def counted(self) -> set[str]:
        """The hosts with energy counted."""
        return {host_id for host_id, host in self._hosts.items() if host.joules}

    def joules(self) -> dict[str, dict[str, float]]:
        """Every counted host's joules by source, to be saved."""
        return {
            host_id: {str(source): j for source, j in host.joules.items()}
            for host_id, host in self._hosts.items()
            if host.joules
        }

    def forget(self, host_id: str) -> None:
        """Drop a host that left the fleet."""
        self._hosts.pop(host_id, None)

    def record(
        self,
        host_id: str,
        ts: float,
        *,
        measured_w: float | None = None,
        cpu_util: float | None = None,
        powered_on: bool = True,
    ) -> float | None:
        """Add a sample taken at ``ts`` (seconds, one clock per host). Returns the watts it was
        valued at, or None when it was dropped (see :class:`HostEnergy`).
        """
        host = self._hosts.setdefault(host_id, _Host())
        if host.last_ts is not None and ts <= host.last_ts:
            host.dropped += 1
            return None
        valued = self._value(host, measured_w, cpu_util, powered_on)
        if valued is None:
            host.dropped += 1
            if not host.warned:
                host.warned = True
                log.warning(
                    "host %s: an energy sample has neither measured watts nor a power model with a CPU "
                    "utilisation; it is not counted (set_model() the host's power model)",
                    host_id,
                )
            if host.last_ts is not None:
                host.gaps += 1
            host.last_ts, host.last_w = ts, None
            return None
        watts, source = valued
        if host.last_ts is not None:
            dt = ts - host.last_ts
            if host.last_w is None or host.last_source is None or dt > self.settings.max_gap_s:
                host.gaps += 1
            else:
                host.joules[host.last_source] = host.joules.get(host.last_source, 0.0) + host.last_w * dt / 2
                host.joules[source] = host.joules.get(source, 0.0) + watts * dt / 2
        host.last_ts, host.last_w, host.last_source = ts, watts, source
        host.samples += 1
        return watts

    async def sample(
        self,
        driver: PowerDriver,
        ts: float,
        *,
        cpu_util: float | None = None,
        powered_on: bool = True,
    ) -> float | None:
        """Read the host's measured watts through ``driver`` (its BMC) and record them, falling back
        to the model when the driver cannot measure or the reading fails.
        """
        try:
            measured = await driver.power_reading_w()
        except PowerError as exc:
            log.info("host %s: no measured power, using the model: %s", driver.host_id, exc)
            measured = None
        return self.record(driver.host_id, ts, measured_w=measured, cpu_util=cpu_util, powered_on=powered_on)

    def kwh(self, host_id: str) -> float:
        """Energy counted for ``host_id`` so far (0 for an unknown host)."""
        host = self._hosts.get(host_id)
        return sum(host.joules.values()) / _JOULES_PER_KWH if host is not None else 0.0

    def source(self, host_id: str) -> EnergySource | None:
        """Where the host's latest valued sample came from."""
        host = self._hosts.get(host_id)
        return host.last_source if host is not None else None

    def host(self, host_id: str) -> HostEnergy:
        host = self._hosts.get(host_id) or _Host()
        return HostEnergy(
            host_id=host_id,
            kwh=sum(host.joules.values()) / _JOULES_PER_KWH,
            kwh_by_source={src: j / _JOULES_PER_KWH for src, j in sorted(host.joules.items())},
            source=host.last_source,
            samples=host.samples,
            gaps=host.gaps,
            dropped=host.dropped,
        )

    def report(self) -> dict[str, HostEnergy]:
        """Every host's energy, by host id."""
        return {host_id: self.host(host_id) for host_id in sorted(self._hosts)}

    def _value(
        self, host: _Host, measured_w: float | None, cpu_util: float | None, powered_on: bool
    ) -> tuple[float, EnergySource] | None:
        if measured_w is not None and math.isfinite(measured_w) and 0 <= measured_w <= _MAX_PLAUSIBLE_W:
            return measured_w, "measured"
        if not powered_on:
            return self.settings.standby_w, "standby"
        if host.model is not None and cpu_util is not None and math.isfinite(cpu_util):
            return host.model.power(min(1.0, max(0.0, cpu_util))), "model"
        return None
