"""Helpers for the power tests: BMC settings that reach the test's ipmi_sim, or nothing at all."""

from __future__ import annotations

import dataclasses
from typing import Any

from controller.hardware import BmcConfig
from tests.support.ipmi import IpmiSim, free_udp_port


def bmc_config(sim: IpmiSim, host_id: str = "h1", **overrides: Any) -> BmcConfig:
    """Settings that reach ``sim`` as its admin user, with short timeouts for tests."""
    config = BmcConfig(
        host_id=host_id,
        address="127.0.0.1",
        port=sim.port,
        username=sim.username,
        password=sim.password,
        timeout_s=5.0,
        confirm_s=5.0,
        poll_s=0.05,
    )
    return dataclasses.replace(config, **overrides)


def dead_bmc_config(host_id: str = "h1", timeout_s: float = 1.0) -> BmcConfig:
    """Settings for a BMC that never answers: a loopback UDP port nothing is bound to."""
    return BmcConfig(
        host_id=host_id,
        address="127.0.0.1",
        port=free_udp_port(),
        username="admin",
        password="password",
        timeout_s=timeout_s,
    )
