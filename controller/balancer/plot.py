"""A picture of one simulated day: hosts on, power drawn, SLA violations and migrations over time.

matplotlib is imported here only (with the file-only Agg backend), so the controller runs without it;
``fleetvisor simulate --plot out.png`` needs it installed.
"""

from __future__ import annotations

import pathlib

from controller.balancer.simulation import SimulationResult

__all__ = ["plot_series"]


def plot_series(result: SimulationResult, path: str | pathlib.Path) -> pathlib.Path:
    """Write a four-panel PNG of ``result``'s day to ``path`` and return the path.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (``pip install matplotlib``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result.series
    metrics = result.metrics
    hours = [t / 3600.0 for t in series.time_s]
    figure, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True, constrained_layout=True)
    axes[0].step(hours, series.active_hosts, where="post", color="tab:blue")
    axes[0].set_ylabel("active hosts")
    axes[1].plot(hours, [w / 1000.0 for w in series.power_w], color="tab:orange")
    axes[1].set_ylabel("power (kW)")
    axes[2].plot(hours, [100.0 * v for v in series.sla_violation], color="tab:red")
    axes[2].set_ylabel("SLA violation\n(% of active host time)")
    axes[3].bar(hours, series.migrations, width=300.0 / 3600.0, color="tab:gray")
    axes[3].set_ylabel("migrations")
    axes[3].set_xlabel("hour of day")
    axes[3].set_xlim(0, 24)
    figure.suptitle(
        f"{metrics.policy} on {metrics.trace}: {metrics.energy_kwh:.1f} kWh, SLATAH {metrics.slatah:.2%}, "
        f"PDM {metrics.pdm:.3%}, {metrics.migrations} migrations"
    )
    out = pathlib.Path(path)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
