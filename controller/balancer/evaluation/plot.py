"""A picture of one simulated day: hosts on, power drawn, SLA violations and migrations over time.

matplotlib is an optional extra (``pip install 'fleetvisor[plot]'``). It is imported here only, when a
plot is drawn (with the file-only Agg backend), so the controller and the simulator run without it;
``fleetvisor simulate --plot out.png`` needs it installed. Part of the trace evaluation; it imports
:mod:`.metrics` (and matplotlib, lazily).
"""

from __future__ import annotations

import pathlib
from types import ModuleType

from controller.balancer.evaluation.metrics import SimulationResult

__all__ = ["INSTALL_HINT", "plot_series"]

#: How to get matplotlib, which the ``plot`` extra installs.
INSTALL_HINT = "pip install 'fleetvisor[plot]'"


def _pyplot() -> ModuleType:
    """Matplotlib's pyplot on the Agg backend, imported on first use.

    Raises:
        ModuleNotFoundError: matplotlib is not installed; the message says to run ``INSTALL_HINT``.
    """
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"plotting needs matplotlib, which cannot be imported ({exc}); install it with {INSTALL_HINT}",
            name=exc.name,
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_series(result: SimulationResult, path: str | pathlib.Path) -> pathlib.Path:
    """Write a four-panel PNG of ``result``'s day to ``path`` and return the path.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (``pip install 'fleetvisor[plot]'``).
    """
    plt = _pyplot()
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
