"""Building a host's power driver from its configuration: the one place that chooses the methods.

The power service, HA's BMC check and BMC fencing all ask here, so a host is switched the same way by
each of them: its BMC (IPMI over LAN) first, then Wake-on-LAN. It imports only the driver modules of
this package.
"""

from __future__ import annotations

from controller.hardware.chain import FallbackPower
from controller.hardware.driver import PowerDriver
from controller.hardware.ipmi import BmcConfig, IpmiDriver
from controller.hardware.wol import WakeOnLanDriver, WolConfig

__all__ = ["bmc_driver", "power_driver"]


def bmc_driver(config: BmcConfig) -> PowerDriver:
    """The driver of the BMC ``config`` describes (IPMI 2.0 over LAN)."""
    return IpmiDriver(config)


def power_driver(host_id: str, bmc: BmcConfig | None, wol: WolConfig | None) -> PowerDriver | None:
    """Host ``host_id``'s power methods in order (its BMC, then Wake-on-LAN), or None when it has none.

    One method is returned as itself; two as a :class:`FallbackPower` that tries them in that order.
    """
    chain: list[PowerDriver] = []
    if bmc is not None:
        chain.append(bmc_driver(bmc))
    if wol is not None:
        chain.append(WakeOnLanDriver(host_id, wol))
    if not chain:
        return None
    return chain[0] if len(chain) == 1 else FallbackPower(chain)
