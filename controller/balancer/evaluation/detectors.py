"""The CloudSim baselines' overload detectors, as CloudSim 3.0.3 codes them (Beloglazov & Buyya, CCPE 2012).

They let the trace evaluation reproduce that paper's figures:

- :class:`ThresholdDetector` (THR): the host's requested load is above a fixed fraction.
- :class:`MadDetector` (MAD): the threshold is ``1 - s * MAD`` of the host's recent utilisation,
  so a host whose load swings gets more headroom; THR 0.7 until 12 samples exist.
- :class:`LocalRegressionDetector` (LR): a straight line through the last 10 samples, extended past
  the longest migration off the host; overloaded when ``s * prediction >= 1``; THR 0.7 until 10
  samples exist. (CloudSim names it Loess, but with no zero weight its "weighted" fit is ordinary
  least squares.)

Histories are as :mod:`controller.balancer.overload` describes them; slots not yet filled are zero,
and zeros at the old end are trimmed (:func:`trim_zero_tail`). Each detector satisfies
:class:`~controller.balancer.overload.OverloadDetector`: it answers for one host and for many at
once, and the two agree. This module imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "LocalRegressionDetector",
    "MadDetector",
    "ThresholdDetector",
    "mad",
    "trim_zero_tail",
    "trimmed_length",
    "trimmed_lengths",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def trimmed_length(history: FloatArray) -> int:
    """Length of ``history`` without its zero tail, but at least 1 (CloudSim's ``countNonZeroBeginning``)."""
    nonzero = np.flatnonzero(history)
    return int(nonzero[-1]) + 1 if nonzero.size else 1


def trimmed_lengths(history: FloatArray) -> npt.NDArray[np.intp]:
    """:func:`trimmed_length` of every row of a 2-D history."""
    if history.shape[1] == 0:
        return np.ones(history.shape[0], dtype=np.intp)
    nonzero = history != 0
    last = history.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last + 1, 1).astype(np.intp)


def trim_zero_tail(history: FloatArray) -> FloatArray:
    """``history`` without trailing zeros; an all-zero history keeps one zero, as in CloudSim."""
    return history[: trimmed_length(history)]


def mad(data: FloatArray) -> float:
    """Median absolute deviation from the median (0 for no data)."""
    if data.size == 0:
        return 0.0
    return float(np.median(np.abs(data - np.median(data))))


@dataclass(frozen=True, slots=True)
class ThresholdDetector:
    """THR: overloaded when requested load exceeds ``threshold`` (strictly)."""

    threshold: float

    def overloaded(self, requested: float, history: FloatArray) -> bool:
        """One host."""
        return requested > self.threshold

    def overloaded_many(self, requested: FloatArray, history: FloatArray) -> BoolArray:
        """Many hosts."""
        return np.asarray(requested > self.threshold)


@dataclass(frozen=True, slots=True)
class MadDetector:
    """MAD: overloaded when requested load exceeds ``1 - safety * MAD(history)``.

    Below ``min_history`` samples (after trimming) it defers to ``fallback``.
    """

    safety: float = 2.5
    fallback: ThresholdDetector = ThresholdDetector(0.7)
    min_history: int = 12

    def __post_init__(self) -> None:
        if self.safety < 0:
            raise ValueError(f"MAD safety parameter must be >= 0, got {self.safety}")

    def upper_threshold(self, history: FloatArray) -> float | None:
        """``1 - s * MAD`` of the trimmed history, or None when it is too short to trust."""
        data = trim_zero_tail(history)
        if data.size < self.min_history:
            return None
        return 1.0 - self.safety * mad(data)

    def overloaded(self, requested: float, history: FloatArray) -> bool:
        """One host."""
        upper = self.upper_threshold(history)
        if upper is None:
            return self.fallback.overloaded(requested, history)
        return requested > upper

    def overloaded_many(self, requested: FloatArray, history: FloatArray) -> BoolArray:
        """Many hosts; rows are grouped by trimmed length so each group is one median call."""
        lengths = trimmed_lengths(history)
        result = self.fallback.overloaded_many(requested, history)
        for length in np.unique(lengths):
            if length < self.min_history:
                continue
            rows = np.flatnonzero(lengths == length)
            data = history[rows, :length]
            med = np.median(data, axis=1)
            spread = np.median(np.abs(data - med[:, None]), axis=1)
            result[rows] = requested[rows] > 1.0 - self.safety * spread
        return result


@dataclass(frozen=True, slots=True)
class LocalRegressionDetector:
    """LR: least squares through the last ``window`` samples, extended ``window + ahead`` steps.

    ``ahead`` is the number of scheduling intervals the longest migration off the host takes,
    rounded up (1 in the standard setup: 1740 MB at 500 Mbit/s is 28 s of a 300 s interval).
    """

    safety: float = 1.2
    ahead: int = 1
    window: int = 10
    fallback: ThresholdDetector = ThresholdDetector(0.7)

    def predict(self, history: FloatArray) -> float | None:
        """Predicted utilisation (before the safety factor), or None when history is too short."""
        if trimmed_length(history) < self.window:
            return None
        return float(self._predict_rows(history[None, : self.window])[0])

    def _predict_rows(self, recent: FloatArray) -> FloatArray:
        # Oldest first at x = 1..window; predict at x = window + ahead.
        y = recent[:, ::-1]
        x = np.arange(1, self.window + 1, dtype=np.float64)
        dx = x - x.mean()
        slope = y @ dx / float(dx @ dx)
        return np.asarray(y.mean(axis=1) + slope * (self.window + self.ahead - x.mean()))

    def overloaded(self, requested: float, history: FloatArray) -> bool:
        """One host."""
        predicted = self.predict(history)
        if predicted is None:
            return self.fallback.overloaded(requested, history)
        return predicted * self.safety >= 1.0

    def overloaded_many(self, requested: FloatArray, history: FloatArray) -> BoolArray:
        """Many hosts."""
        lengths = trimmed_lengths(history)
        result = self.fallback.overloaded_many(requested, history)
        rows = np.flatnonzero(lengths >= self.window)
        if rows.size:
            predicted = self._predict_rows(history[rows, : self.window])
            result[rows] = predicted * self.safety >= 1.0
        return result
