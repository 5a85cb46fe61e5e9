"""EnergyMeter: kWh per host from measured watts where available, from the power model otherwise."""

from __future__ import annotations

import pytest

from controller.hardware import EnergyMeter, EnergySettings, LinearPowerModel, SimPowerDriver


def test_measured_watts_are_integrated_into_kwh() -> None:
    """Pins the arithmetic: 100 W then 300 W an hour apart is the trapezoid, 0.2 kWh, all measured."""
    meter = EnergyMeter(EnergySettings(max_gap_s=7200))
    meter.record("h1", 0.0, measured_w=100.0)
    meter.record("h1", 3600.0, measured_w=300.0)

    energy = meter.host("h1")
    assert energy.kwh == pytest.approx(0.2)
    assert energy.kwh_by_source == {"measured": pytest.approx(0.2)}
    assert energy.source == "measured"
    assert meter.kwh("h1") == pytest.approx(0.2)


def test_the_model_values_samples_without_a_measurement() -> None:
    """Pins the fallback model: idle + (max - idle) * cpu_util, 100 + 200 * 0.5 = 200 W for an hour."""
    meter = EnergyMeter(EnergySettings(max_gap_s=7200))
    meter.set_model("h1", LinearPowerModel(idle_w=100.0, max_w=300.0))

    assert meter.record("h1", 0.0, cpu_util=0.5) == 200.0
    assert meter.record("h1", 3600.0, cpu_util=0.5) == 200.0

    assert meter.kwh("h1") == pytest.approx(0.2)
    assert meter.source("h1") == "model"


def test_a_measurement_is_preferred_to_the_model_and_sources_are_split() -> None:
    """Pins the preference (measured over model) and that each half-interval counts for its own source."""
    meter = EnergyMeter(EnergySettings(max_gap_s=7200))
    meter.set_model("h1", LinearPowerModel(idle_w=100.0, max_w=300.0))

    assert meter.record("h1", 0.0, measured_w=150.0, cpu_util=1.0) == 150.0
    meter.record("h1", 3600.0, cpu_util=1.0)  # no reading this time: the model's 300 W

    energy = meter.host("h1")
    assert energy.kwh_by_source == {"measured": pytest.approx(0.075), "model": pytest.approx(0.15)}
    assert energy.kwh == pytest.approx(0.225)
    assert energy.source == "model"


def test_holes_and_stale_samples_are_not_counted() -> None:
    """Pins that a gap longer than max_gap_s, an unvalued sample and an out-of-order one add nothing."""
    meter = EnergyMeter(EnergySettings(max_gap_s=60))
    meter.record("h1", 0.0, measured_w=100.0)
    meter.record("h1", 3600.0, measured_w=100.0)  # an hour of silence: not invented
    meter.record("h1", 3610.0, cpu_util=0.5)  # no model: cannot be valued
    meter.record("h1", 3620.0, measured_w=100.0)
    meter.record("h1", 3615.0, measured_w=100.0)  # older than the latest
    meter.record("h1", 3630.0, measured_w=100.0)

    energy = meter.host("h1")
    assert energy.kwh == pytest.approx(100.0 * 10 / 3_600_000)
    assert (energy.samples, energy.gaps, energy.dropped) == (4, 3, 2)


def test_a_host_that_is_off_counts_at_standby_power() -> None:
    """Pins that an unmeasured host that is off is valued at standby_w, not at its idle power."""
    meter = EnergyMeter(EnergySettings(max_gap_s=7200, standby_w=5.0))
    meter.set_model("h1", LinearPowerModel(idle_w=100.0, max_w=300.0))
    meter.record("h1", 0.0, powered_on=False)
    meter.record("h1", 3600.0, powered_on=False)

    assert meter.kwh("h1") == pytest.approx(0.005)
    assert meter.source("h1") == "standby"


class _StepModel:
    """A made-up model that is not a LinearPowerModel: 90 W below half load, 250 W above."""

    def power(self, utilization: float, /) -> float:
        return 90.0 if utilization < 0.5 else 250.0


def test_any_power_model_with_a_power_method_fits() -> None:
    """Pins that any object with power(utilization) -> watts values samples (the balancer's tables too)."""
    meter = EnergyMeter()
    meter.set_model("h1", _StepModel())
    assert meter.record("h1", 0.0, cpu_util=0.2) == 90.0
    assert meter.record("h1", 1.0, cpu_util=1.5) == 250.0  # clipped to 1.0 before the model sees it


async def test_sample_prefers_the_bmc_reading_and_falls_back_to_the_model() -> None:
    """Pins sample(): a driver's measured watts when it has them, the model when it has none or fails."""
    meter = EnergyMeter()
    meter.set_model("h1", LinearPowerModel(idle_w=100.0, max_w=300.0))
    meter.set_model("h2", LinearPowerModel(idle_w=100.0, max_w=300.0))
    meter.set_model("h3", LinearPowerModel(idle_w=100.0, max_w=300.0))

    assert await meter.sample(SimPowerDriver("h1", watts=180.0), 0.0, cpu_util=0.5) == 180.0
    assert await meter.sample(SimPowerDriver("h2"), 0.0, cpu_util=0.5) == 200.0
    failing = SimPowerDriver("h3", watts=180.0, delay_s=1.0, timeout_s=0.01)
    assert await meter.sample(failing, 0.0, cpu_util=0.5) == 200.0
    assert [meter.source(h) for h in ("h1", "h2", "h3")] == ["measured", "model", "model"]
