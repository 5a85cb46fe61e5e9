"""Overload detectors against hand-computed values, and their vectorised forms against the scalar ones."""

from __future__ import annotations

import numpy as np
import pytest

from controller.balancer.evaluation.detectors import (
    LocalRegressionDetector,
    MadDetector,
    ThresholdDetector,
    mad,
    trim_zero_tail,
    trimmed_lengths,
)
from controller.balancer.overload import PredictiveDetector


def _history(newest_first: list[float], size: int = 30) -> np.ndarray:
    out = np.zeros(size)
    out[: len(newest_first)] = newest_first
    return out


def test_zero_tail_is_trimmed_but_inner_zeros_stay():
    """Only the oldest zeros go; an all-zero history keeps one zero (CloudSim's countNonZeroBeginning)."""
    assert trim_zero_tail(np.array([0.5, 0.0, 0.2, 0.0, 0.0])).tolist() == [0.5, 0.0, 0.2]
    assert trim_zero_tail(np.zeros(5)).tolist() == [0.0]
    rows = np.array([[0.5, 0.0, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert trimmed_lengths(rows).tolist() == [3, 1, 4]


def test_mad_by_hand():
    """[1, 2, 3, 4, 100]: median 3, deviations [2, 1, 0, 1, 97], MAD 1."""
    assert mad(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == 1.0
    assert mad(np.array([])) == 0.0


def test_threshold_is_strict():
    """THR 0.8: exactly 80 % is fine, a hair more is overloaded."""
    thr = ThresholdDetector(0.8)
    assert not thr.overloaded(0.8, np.zeros(30))
    assert thr.overloaded(0.8001, np.zeros(30))


def test_mad_threshold_by_hand():
    """Twelve samples alternating 0.5/0.6: median 0.55, MAD 0.05, threshold 1 - 2.5 * 0.05 = 0.875."""
    detector = MadDetector(2.5)
    history = _history([0.5, 0.6] * 6)
    assert detector.upper_threshold(history) == pytest.approx(0.875)
    assert not detector.overloaded(0.87, history)
    assert detector.overloaded(0.88, history)


def test_mad_falls_back_to_threshold_below_twelve_samples():
    """With 11 samples MAD defers to THR 0.7, which calls 0.75 overloaded."""
    detector = MadDetector(2.5)
    history = _history([0.5, 0.6] * 5 + [0.5])
    assert detector.upper_threshold(history) is None
    assert detector.overloaded(0.75, history)
    assert not detector.overloaded(0.65, history)


def test_local_regression_predicts_one_interval_past_the_last_sample():
    """Oldest first 0.2, 0.4, 0.3, ... 0.8 at x = 1..10: slope 4.5 / 82.5, prediction at x = 11 is 0.8."""
    oldest_first = [0.2, 0.4, 0.3, 0.5, 0.4, 0.6, 0.5, 0.7, 0.6, 0.8]
    history = _history(oldest_first[::-1])
    detector = LocalRegressionDetector(1.2)
    assert detector.predict(history) == pytest.approx(0.8)
    assert not detector.overloaded(0.8, history)  # 1.2 * 0.8 = 0.96 < 1


def test_local_regression_flags_a_rising_line():
    """Y = 0.3 + 0.05 x reaches 0.85 at x = 11, and 1.2 * 0.85 >= 1."""
    history = _history([0.3 + 0.05 * x for x in range(10, 0, -1)])
    detector = LocalRegressionDetector(1.2)
    assert detector.predict(history) == pytest.approx(0.85)
    assert detector.overloaded(0.5, history)


def test_local_regression_uses_only_the_last_ten_samples():
    """Older samples than the window change nothing."""
    recent = [0.3 + 0.05 * x for x in range(10, 0, -1)]
    detector = LocalRegressionDetector(1.2)
    short = detector.predict(_history(recent))
    long = detector.predict(_history(recent + [0.99] * 20))
    assert short is not None and long is not None
    assert short == pytest.approx(long)


def test_local_regression_falls_back_to_threshold_below_ten_samples():
    """Nine samples: THR 0.7 on the requested load decides."""
    history = _history([0.1] * 9)
    detector = LocalRegressionDetector(1.2)
    assert detector.predict(history) is None
    assert detector.overloaded(0.75, history)
    assert not detector.overloaded(0.65, history)


def test_predictive_detector_bounds_by_hand():
    """Oldest first 1, 3, 2, 4: slope 0.8, forecast 4.5, residual sd sqrt(0.9), standard error 1.5."""
    detector = PredictiveDetector(z=1.0, window=4)
    series = np.array([[4.0, 2.0, 3.0, 1.0]])  # most recent first
    predicted, error = detector.forecast_many(series)
    assert predicted[0] == pytest.approx(4.5)
    assert error[0] == pytest.approx(1.5)
    assert detector.upper_many(series)[0] == pytest.approx(6.0)
    assert detector.lower_many(series)[0] == pytest.approx(4.0)  # 4.5 - 1.5 = 3.0, floored at the load now


def test_predictive_detector_needs_a_confident_overload():
    """A noisy host whose upper bound crosses 100 % is not overloaded; a steadily rising one is."""
    detector = PredictiveDetector(z=1.0, window=6)
    noisy = _history([0.9, 0.5, 0.95, 0.4, 0.9, 0.5])
    rising = _history([1.0, 0.95, 0.9, 0.85, 0.8, 0.75])
    assert detector.upper_many(noisy[None, :])[0] > 1.0
    assert not detector.overloaded(0.9, noisy)
    assert detector.overloaded(1.0, rising)  # at 100 % now, and the line reaches 105 % with no residual
    assert detector.overloaded(1.05, noisy)  # over now is over


def test_predictive_detector_without_a_line_uses_the_load_now():
    """Fewer than three samples: the forecast is the load now, with no error."""
    detector = PredictiveDetector(z=2.0, window=6)
    predicted, error = detector.forecast_many(np.array([[0.7, 0.2]]))
    assert predicted[0] == 0.7 and error[0] == 0.0


@pytest.mark.parametrize(
    "detector",
    [ThresholdDetector(0.8), MadDetector(2.5), LocalRegressionDetector(1.2), PredictiveDetector(z=1.0)],
    ids=["thr", "mad", "lr", "predictive"],
)
def test_vectorised_detection_matches_one_host_at_a_time(detector):
    """overloaded_many agrees with overloaded on random histories of every length."""
    rng = np.random.default_rng(7)
    rows = []
    for length in range(0, 31):
        for _ in range(4):
            rows.append(_history(list(rng.uniform(0.0, 1.1, size=length))))
    history = np.array(rows)
    requested = rng.uniform(0.3, 1.1, size=len(rows))
    history[:, 0] = np.where(history[:, 0] > 0, requested, 0.0)
    many = detector.overloaded_many(requested, history)
    one = [detector.overloaded(float(r), h) for r, h in zip(requested, history, strict=True)]
    assert many.tolist() == one
