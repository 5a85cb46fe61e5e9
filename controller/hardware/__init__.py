"""Power control for hosts: switch them on and off, check they can be woken, and count their energy.

One interface, :class:`PowerDriver`, with these methods behind it:
- :class:`IpmiDriver` (:mod:`.ipmi`): the host's BMC over IPMI 2.0 with pyghmi;
- :class:`WakeOnLanDriver` (:mod:`.wol`): a magic packet; wakes only;
- :class:`SimPowerDriver` (:mod:`.sim`): in memory, with failure injection, for tests and the demo;
- :class:`FallbackPower` (:mod:`.chain`): several of the above for one host, tried in order.

:func:`power_driver` and :func:`bmc_driver` (:mod:`.factory`) build a host's driver from its settings;
every user of a host's power (the power service, HA, fencing) gets it there.

:class:`EnergyMeter` (:mod:`.energy`) turns BMC readings, or a host's power model, into kWh.

Settings are passed explicitly (:class:`BmcConfig`, :class:`WolConfig`); every call has a timeout, and
every failure is a :class:`PowerError` that names the host, the target, the reason and the fix.
"""

from __future__ import annotations

from controller.hardware.chain import FallbackExhausted, FallbackPower
from controller.hardware.driver import PowerDriver, PowerError, PowerState, WakeCheck
from controller.hardware.energy import (
    EnergyMeter,
    EnergySettings,
    EnergySource,
    HostEnergy,
    HostPowerModel,
    LinearPowerModel,
)
from controller.hardware.factory import bmc_driver, power_driver
from controller.hardware.ipmi import BmcConfig, IpmiDriver
from controller.hardware.sim import SimPowerDriver
from controller.hardware.wol import WakeOnLanDriver, WolConfig, load_wol_config

__all__ = [
    "BmcConfig",
    "EnergyMeter",
    "EnergySettings",
    "EnergySource",
    "FallbackExhausted",
    "FallbackPower",
    "HostEnergy",
    "HostPowerModel",
    "IpmiDriver",
    "LinearPowerModel",
    "PowerDriver",
    "PowerError",
    "PowerState",
    "SimPowerDriver",
    "WakeCheck",
    "WakeOnLanDriver",
    "WolConfig",
    "bmc_driver",
    "load_wol_config",
    "power_driver",
]
