"""Overload detection for the live planner: is a host (about to be) short of CPU?

:class:`OverloadDetector` is the interface every detector satisfies. :class:`PredictiveDetector` is
Fleetvisor's own: an upper confidence bound of the load at the next interval (a fitted line plus
``z`` standard errors), compared with a threshold. The CloudSim baselines' detectors (THR, MAD, LR)
belong to the offline trace evaluation (:mod:`controller.balancer.evaluation.detectors`).

A host's utilisation history is a vector, most recent sample first, of the sum of its VMs'
utilisation each weighted by VM MIPS / host MIPS (CloudSim's ``PowerHostUtilizationHistory``).
Each detector answers for one host (:meth:`~OverloadDetector.overloaded`) and for many at once
(:meth:`~OverloadDetector.overloaded_many`), and the two agree. This module imports nothing of the
project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["OverloadDetector", "PredictiveDetector"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class OverloadDetector(Protocol):
    """Answers "is this host overloaded?" from its requested load and its utilisation history."""

    def overloaded(self, requested: float, history: FloatArray) -> bool:
        """One host: ``requested`` is requested MIPS / host MIPS now; ``history`` most recent first."""
        ...

    def overloaded_many(self, requested: FloatArray, history: FloatArray) -> BoolArray:
        """Many hosts: ``requested`` shape (h,), ``history`` shape (h, samples)."""
        ...


@dataclass(frozen=True, slots=True)
class PredictiveDetector:
    """Fleetvisor: a least squares line through the last ``window`` samples, extended one step.

    Its standard error (residual spread, widened for the extrapolation) gives a confidence band of
    ``z`` errors either side. The detector calls a host overloaded when it is over ``threshold`` now
    or when even the band's *lower* edge is: a migration is paid only for an overload that is
    likely, not merely possible. Placement asks the opposite question with the *upper* edge (is it
    confidently safe?). A steady host needs little headroom, a noisy one more, and a rising one is
    caught before it is short.
    """

    z: float = 1.0
    window: int = 6
    threshold: float = 1.0

    def forecast_many(self, series: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Predicted next sample of each row (most recent first) and its standard error.

        With fewer than three samples there is no line: the forecast is the sample now, error 0.
        """
        w = min(self.window, series.shape[1])
        if w < 3:
            return np.asarray(series[:, 0].copy()), np.zeros(series.shape[0])
        y = series[:, :w][:, ::-1]
        x = np.arange(1, w + 1, dtype=np.float64)
        dx = x - x.mean()
        sxx = float(dx @ dx)
        slope = y @ dx / sxx
        mean = y.mean(axis=1)
        fitted = mean[:, None] + slope[:, None] * dx[None, :]
        residual = np.sqrt(np.sum((y - fitted) ** 2, axis=1) / (w - 2))
        ahead = w + 1 - x.mean()
        error = residual * np.sqrt(1.0 + 1.0 / w + ahead * ahead / sxx)
        return np.asarray(mean + slope * ahead), np.asarray(error)

    def upper_many(self, series: FloatArray) -> FloatArray:
        """Upper confidence bound of the next sample, never below the sample now."""
        predicted, error = self.forecast_many(series)
        return np.asarray(np.maximum(series[:, 0], predicted + self.z * error))

    def lower_many(self, series: FloatArray) -> FloatArray:
        """Lower confidence bound of the next sample, never below the sample now."""
        predicted, error = self.forecast_many(series)
        return np.asarray(np.maximum(series[:, 0], predicted - self.z * error))

    def overloaded(self, requested: float, history: FloatArray) -> bool:
        """One host (``history`` in utilisation, most recent first; ``requested`` replaces its head)."""
        series = np.concatenate([[requested], history[1:]]) if history.size else np.array([requested])
        return bool(self.lower_many(series[None, :])[0] > self.threshold)

    def overloaded_many(self, requested: FloatArray, history: FloatArray) -> BoolArray:
        """Many hosts."""
        series = history.copy() if history.shape[1] else requested[:, None].copy()
        series[:, 0] = requested
        return np.asarray(self.lower_many(series) > self.threshold)
