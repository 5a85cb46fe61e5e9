"""What one simulated day adds up to: CloudSim's metrics, the time series behind them, their texts.

Metrics (CloudSim's ``Helper``): energy in kWh; SLATAH, the share of active host time during which a
host got less CPU than its VMs asked; PDM, the CPU lost to migrations over all CPU requested; SLAV =
SLATAH x PDM; ESV = energy x SLAV; and the number of migrations. :func:`format_summary` is a line for
people and :func:`format_metrics` the CLI's machine-readable last line.

Part of the trace evaluation; it imports nothing of the project, so the plot can read results
without the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

__all__ = ["Metrics", "Series", "SimulationResult", "format_metrics", "format_summary"]


class Metrics(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one simulated day (fractions, not percent)."""

    policy: str
    trace: str
    vms: int
    hosts: int
    steps: int
    energy_kwh: float
    slatah: float
    pdm: float
    slav: float
    esv: float
    migrations: int
    #: Runs through the live scheduler (Fleetvisor's policy): planned moves its filters refused.
    gated: bool = False
    vetoed: int = 0


def format_summary(metrics: Metrics) -> str:
    """A line for people, printed before :func:`format_metrics`."""
    return (
        f"{metrics.policy} on {metrics.trace}: {metrics.vms} VMs, {metrics.hosts} hosts, {metrics.steps} intervals: "
        f"{metrics.energy_kwh:.2f} kWh, SLATAH {metrics.slatah:.3%}, PDM {metrics.pdm:.4%}, "
        f"SLAV {metrics.slav:.3g}, ESV {metrics.esv:.3g}, {metrics.migrations} migrations"
        + (f"; the live scheduler vetted every move and refused {metrics.vetoed}" if metrics.gated else "")
    )


def format_metrics(metrics: Metrics) -> str:
    """The CLI's last line: ``energy_kwh=.. slatah=.. pdm=.. slav=.. esv=.. migrations=..``."""
    return (
        f"energy_kwh={metrics.energy_kwh:.2f} slatah={metrics.slatah:.6g} pdm={metrics.pdm:.6g} "
        f"slav={metrics.slav:.6g} esv={metrics.esv:.6g} migrations={metrics.migrations}"
    )


@dataclass
class Series:
    """Per decision interval, for plots: what the datacenter did between one decision and the next."""

    time_s: list[float] = field(default_factory=list)
    active_hosts: list[int] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)  #: mean power over the interval
    sla_violation: list[float] = field(default_factory=list)  #: share of active host time violating
    migrations: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SimulationResult:
    """Metrics plus the time series behind them."""

    metrics: Metrics
    series: Series
