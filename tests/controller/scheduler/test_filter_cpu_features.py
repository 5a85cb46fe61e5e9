"""CpuFeaturesFilter: every required CPU feature must be in the host's cpu_features."""

from __future__ import annotations

from controller.scheduler.filters import CpuFeaturesFilter
from tests.controller.scheduler.support import assert_filter_agrees, fleet, record, request, view


def test_all_required_features_must_be_present():
    """vmx+aes passes a host with vmx, aes and more, and fails one with only vmx."""
    f = CpuFeaturesFilter()
    assert f.host_passes(view(cpu_features=["vmx", "aes", "avx2"]), request(required_features=("vmx", "aes")))
    assert not f.host_passes(view(cpu_features=["vmx"]), request(required_features=("vmx", "aes")))
    assert not f.applies(request())


def test_bitsets_agree_past_64_features_and_for_unknown_ones():
    """With more than 64 distinct flags (two words) the mask still agrees; an unknown flag matches none."""
    many = [f"f{i}" for i in range(100)]
    state = fleet(
        record("all", cpu_features=many),
        record("low", cpu_features=many[:60]),
        record("high", cpu_features=[*many[60:], "vmx"]),
    )
    for wanted in (("f1",), ("f70",), ("f1", "f70"), ("vmx", "f99"), ("nope",), ("f1", "nope")):
        assert_filter_agrees(CpuFeaturesFilter(), state, request(required_features=wanted))
    assert CpuFeaturesFilter().mask(state, request(required_features=("f1", "f70")))[:3].tolist() == [
        True,
        False,
        False,
    ]


def test_refusal_names_the_features():
    """The reason names what was asked for."""
    assert CpuFeaturesFilter().phrase("cpu_features", 3, request(required_features=("vmx",))) == (
        "3 hosts lack CPU feature vmx"
    )
