"""The simulator: metrics on a tiny hand-computed day, CloudSim's mechanics, trace files, a real day."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest

from controller.balancer.evaluation import (
    Metrics,
    TraceError,
    format_metrics,
    format_summary,
    load_trace,
    make_policy,
    run,
    simulate,
    standard_fleet,
)
from tests.controller.balancer.support import ScriptedPolicy, small_fleet, trace
from tests.support.needs import need_module, needs

DATA = pathlib.Path(__file__).resolve().parents[4] / "shared" / "data" / "planetlab"
SMALLEST_DAY = DATA / "20110306.csv.gz"
#: CI has the traces beside the checkout, so there a missing day fails rather than skips.
needs_data = needs(
    SMALLEST_DAY.exists(), f"PlanetLab traces not found in {DATA} (expected {SMALLEST_DAY.name})"
)


def test_metrics_of_one_migration_by_hand():
    """Two 500-MIPS VMs at 50 % on host 0; VM 1 moves to host 1 at 300.1 s and arrives 10 s later.

    Linear power 100 W + 100 W x load. Samples at 0, 300, 600 s give decisions at 300.1 and 600.1 s.
    - 0..300.1 s: hosts were never measured, so nothing is billed (CloudSim's first interval).
    - 300.1..310.1 s: host 0 at 50 % (the leaving VM still counts in full), 150 W x 10 s; host 1
      holds 10 % of the arriving VM's 250 MIPS (2.5 %), 102.5 W x 10 s and it violates: its VMs
      ask 250 MIPS and get 25. The moving VM gets 225 of 250 MIPS: 25 x 10 MIPS s lost.
    - 310.1..600.1 s: both hosts at 25 %, 125 W x 290 s each, no violation.
    Energy 1500 + 1025 + 2 x 36250 J; SLATAH 10 / (2 x 10 + 2 x 290); PDM 250 / (500 x 300).
    """
    fleet = small_fleet([1000, 1000], [500, 500], vm_ram_mb=[625, 625])
    policy = ScriptedPolicy(placement=[0, 0], moves={1: [(1, 1)]})
    metrics = simulate(trace([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]), policy, fleet=fleet).metrics
    assert metrics.steps == 2
    assert metrics.migrations == 1
    assert metrics.energy_kwh == pytest.approx((1500 + 1025 + 2 * 36250) / 3.6e6)
    assert metrics.slatah == pytest.approx(10 / 600)
    assert metrics.pdm == pytest.approx(250 / 150_000)
    assert metrics.slav == pytest.approx(metrics.slatah * metrics.pdm)
    assert metrics.esv == pytest.approx(metrics.energy_kwh * metrics.slav)


def test_policy_sees_demand_interpolated_at_each_decision_and_the_history_behind_it():
    """At 300.1 s a VM going 20 % -> 80 % asks 20 % + 60 % x 0.1/300 of its MIPS; history grows by one."""
    fleet = small_fleet([1000], [1000])
    policy = ScriptedPolicy(placement=[0])
    simulate(trace([[0.1, 0.2, 0.8, 0.8]]), policy, fleet=fleet)
    first, second = policy.seen[0], policy.seen[1]
    assert first.vm_requested[0] == pytest.approx(1000 * (0.2 + 0.6 * 0.1 / 300))
    assert first.history_length == 1 and second.history_length == 2
    assert second.vm_history[0, 1] == pytest.approx(first.vm_requested[0] / 1000)


def test_a_vm_asking_for_nothing_leaves_and_its_host_switches_off():
    """Two zero samples in a row: the VM is done (CloudSim), its host draws nothing after."""
    fleet = small_fleet([1000, 1000], [1000, 1000])
    policy = ScriptedPolicy(placement=[0, 1])
    result = simulate(trace([[0.5, 0.5, 0.5, 0.5], [0.5, 0.0, 0.0, 0.0]]), policy, fleet=fleet)
    assert policy.seen[0].vm_host.tolist() == [0, -1]
    assert result.series.active_hosts == [1, 1, 1]
    # Host 0 at 50 % (150 W) from 300.1 to 900.1 s is all the energy.
    assert result.metrics.energy_kwh == pytest.approx(150 * 600 / 3.6e6)


def test_an_oversubscribed_host_shares_its_cpu_and_violates():
    """Two VMs asking 600 MIPS each on 1000: each gets floor(500), the host violates all the time."""
    fleet = small_fleet([1000], [1000, 1000])
    result = simulate(trace([[0.6] * 3, [0.6] * 3]), ScriptedPolicy(placement=[0, 0]), fleet=fleet)
    assert result.metrics.slatah == pytest.approx(1.0)
    assert result.metrics.pdm == 0.0  # no migration, so no migration degradation
    assert result.metrics.energy_kwh == pytest.approx(200 * 300 / 3.6e6)


def test_a_vm_larger_than_a_core_is_capped_and_its_host_violates():
    """A 2000-MIPS VM at 95 % on two 1000-MIPS cores gets one core: the host violates."""
    fleet = small_fleet([2000], [2000], cores=2)
    result = simulate(trace([[0.95] * 3]), ScriptedPolicy(placement=[0]), fleet=fleet)
    assert result.metrics.slatah == pytest.approx(1.0)


def test_first_placement_must_respect_ram_and_network():
    """CloudSim refuses to create more VMs on a host than its RAM holds."""
    fleet = small_fleet([1000], [100] * 7, vm_ram_mb=[625] * 7)
    with pytest.raises(ValueError, match="4096 MB"):
        simulate(trace([[0.1] * 3] * 7), ScriptedPolicy(placement=[0] * 7), fleet=fleet)


def test_impossible_migrations_are_refused():
    """Moving a VM to a host that does not exist is a policy bug, reported as such."""
    fleet = small_fleet([1000, 1000], [100])
    with pytest.raises(ValueError, match="host 5 does not exist"):
        simulate(trace([[0.1] * 3]), ScriptedPolicy(placement=[0], moves={1: [(0, 5)]}), fleet=fleet)


def test_standard_fleet_follows_the_literature():
    """Even hosts are G4 (2 x 1860), odd G5 (2 x 2660); VM i gets type i // ceil(n / 4)."""
    fleet = standard_fleet(10)
    assert fleet.hosts == 800
    assert fleet.host_mips[:2].tolist() == [3720.0, 5320.0]
    assert fleet.host_core_mips[:2].tolist() == [1860.0, 2660.0]
    assert fleet.vm_mips.tolist() == [2500, 2500, 2500, 2000, 2000, 2000, 1000, 1000, 1000, 500]
    assert fleet.vm_ram_mb.tolist()[::3] == [870, 1740, 1740, 613]
    assert fleet.migration_seconds(0) == pytest.approx(870 / 62.5)


def test_traces_load_from_plain_and_gzipped_csv(tmp_path: pathlib.Path):
    """Percent to fraction, the last sample padded once, the day named after the file."""
    text = "vm-a,10,20,30\nvm-b,0,100,50\n"
    plain = tmp_path / "20990101.csv"
    plain.write_text(text)
    packed = tmp_path / "20990102.csv.gz"
    with gzip.open(packed, "wt") as handle:
        handle.write(text)
    for path in (plain, packed):
        loaded = load_trace(path)
        assert loaded.vm_names == ("vm-a", "vm-b")
        assert loaded.samples == 3
        assert loaded.utilization[0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert load_trace(packed).name == "20990102"


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no VMs"), ("a,1,2\nb,1\n", "same number"), ("a,1,200\n", "percentage"), ("a,1,x\n", "line 1")],
)
def test_bad_traces_are_refused_with_the_reason(tmp_path: pathlib.Path, content: str, message: str):
    """Empty, ragged, out-of-range or non-numeric traces name the file and the problem."""
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_a_missing_trace_says_where_to_look(tmp_path: pathlib.Path):
    """The error names the path."""
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "nope.csv.gz")


def test_metrics_line_format():
    """The CLI's last line: six key=value pairs, fractions not percent."""
    metrics = Metrics(
        policy="p", trace="t", vms=1, hosts=1, steps=1, energy_kwh=123.456, slatah=0.05,
        pdm=0.0006, slav=0.00003, esv=0.0037, migrations=42,
    )  # fmt: skip
    assert format_metrics(metrics) == (
        "energy_kwh=123.46 slatah=0.05 pdm=0.0006 slav=3e-05 esv=0.0037 migrations=42"
    )
    assert format_summary(metrics).startswith(
        "p on t: 1 VMs, 1 hosts, 1 intervals: 123.46 kWh, SLATAH 5.000%"
    )


@needs_data
def test_a_real_day_reproduces_cloudsim_thr_within_ten_percent():
    """20110306 under THR-MMT-0.8: CloudSim 3.0.3 gave 144.74 kWh and 20 908 migrations."""
    metrics = simulate(load_trace(SMALLEST_DAY), make_policy("THR-MMT-0.8")).metrics
    assert metrics.steps == 287
    assert metrics.energy_kwh == pytest.approx(144.74, rel=0.10)
    assert metrics.migrations == pytest.approx(20908, rel=0.10)


@needs_data
def test_history_based_baselines_run_on_a_real_day():
    """LR and MAD run their first 40 decisions (past their fallbacks) on 20110306."""
    day = load_trace(SMALLEST_DAY)
    for name in ("LR-MMT-1.2", "MAD-MMT-2.5"):
        metrics = simulate(day, make_policy(name), max_steps=40).metrics
        assert metrics.steps == 40
        assert metrics.migrations > 0 and metrics.energy_kwh > 0


@needs_data
def test_fleetvisor_runs_a_real_day_and_plots_it(tmp_path: pathlib.Path):
    """The default policy runs all of 20110306 through run(), and the plot is a PNG."""
    need_module("matplotlib", "matplotlib is not installed (pip install -e '.[dev]' or '.[plot]')")
    out = tmp_path / "day.png"
    metrics = run(SMALLEST_DAY, "fleetvisor", plot_path=out)
    assert metrics.policy == "fleetvisor" and metrics.steps == 287
    assert metrics.migrations < 20908 / 2
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite([metrics.energy_kwh, metrics.slatah, metrics.pdm]).all()
