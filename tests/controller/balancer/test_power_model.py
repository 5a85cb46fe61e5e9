"""SPECpower tables: exact at the measured points, linear between them, 0..1 only."""

from __future__ import annotations

import numpy as np
import pytest

from controller.balancer.power_model import (
    HP_PROLIANT_ML110_G4,
    HP_PROLIANT_ML110_G5,
    SpecPowerModel,
    power_of,
)


def test_measured_points_are_returned_exactly():
    """At 0 %, 50 % and 100 % the tables' own figures come back."""
    assert HP_PROLIANT_ML110_G4.power(0.0) == 86.0
    assert HP_PROLIANT_ML110_G4.power(1.0) == 117.0
    assert HP_PROLIANT_ML110_G5.power(0.5) == pytest.approx(116.0)
    assert HP_PROLIANT_ML110_G5.idle_watts == 93.7
    assert HP_PROLIANT_ML110_G5.max_watts == 135.0


def test_power_is_interpolated_linearly_between_points():
    """Halfway between two points is the mean of their watts (G4 5 %: 87.7 W; G5 55 %: 118.5 W)."""
    assert HP_PROLIANT_ML110_G4.power(0.05) == pytest.approx(87.7)
    assert HP_PROLIANT_ML110_G5.power(0.55) == pytest.approx(118.5)
    assert HP_PROLIANT_ML110_G5.power(0.925) == pytest.approx(133.0 + 0.25 * 2.0)


def test_vectorised_power_agrees_with_the_scalar_model():
    """power_of over two kinds matches each model's own answer."""
    tables = np.array([HP_PROLIANT_ML110_G4.watts, HP_PROLIANT_ML110_G5.watts])
    u = np.linspace(0.0, 1.0, 37)
    kinds = np.arange(u.size) % 2
    expected = [
        (HP_PROLIANT_ML110_G4 if k == 0 else HP_PROLIANT_ML110_G5).power(float(x))
        for k, x in zip(kinds, u, strict=True)
    ]
    assert power_of(tables, kinds, u) == pytest.approx(expected)


def test_vectorised_power_clips_a_hair_above_full_load():
    """A rounding error past 100 % costs full-load power, not an exception."""
    tables = np.array([HP_PROLIANT_ML110_G4.watts])
    assert power_of(tables, np.array([0]), np.array([1.0 + 1e-12]))[0] == 117.0


@pytest.mark.parametrize("utilization", [-0.01, 1.01])
def test_utilisation_outside_zero_to_one_is_refused(utilization: float):
    """The scalar model refuses loads CloudSim refuses."""
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        HP_PROLIANT_ML110_G4.power(utilization)


def test_malformed_tables_are_refused():
    """A table needs 11 points and must not fall as load rises."""
    with pytest.raises(ValueError, match="11 points"):
        SpecPowerModel("short", (1.0, 2.0))
    with pytest.raises(ValueError, match="must not fall"):
        SpecPowerModel("falling", (10.0,) * 10 + (9.0,))
