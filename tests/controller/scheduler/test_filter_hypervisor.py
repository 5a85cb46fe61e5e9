"""HypervisorFilter: a request may require an accel (kvm) or an engine (qemu)."""

from __future__ import annotations

from controller.scheduler.filters import HypervisorFilter
from tests.controller.scheduler.support import assert_filter_agrees, fleet, record, request, view


def test_accel_and_engine_requirements():
    """accel=kvm refuses a TCG host; engine=qemu refuses a sim host; no requirement passes all."""
    f = HypervisorFilter()
    kvm, tcg, sim = view(accel="kvm"), view(accel="tcg"), view(engine="sim", accel="sim")
    assert f.host_passes(kvm, request(accel="kvm")) and not f.host_passes(tcg, request(accel="kvm"))
    assert f.reason(sim, request(engine="qemu")) == "engine"
    assert f.reason(tcg, request(engine="qemu", accel="kvm")) == "accel"
    assert not f.applies(request())


def test_mask_agrees_including_values_no_host_has():
    """The code comparison agrees with host_passes; an engine nobody runs matches nothing."""
    state = fleet(record("a", accel="kvm"), record("b", accel="tcg"), record("c", engine="sim", accel="sim"))
    for req in (
        request(accel="kvm"),
        request(engine="qemu"),
        request(engine="qemu", accel="tcg"),
        request(engine="xen"),
        request(accel="kvm", engine="sim"),
    ):
        assert_filter_agrees(HypervisorFilter(), state, req)


def test_refusal_words():
    """Reasons name the accel or engine asked for."""
    f = HypervisorFilter()
    assert f.phrase("accel", 2, request(accel="kvm")) == "2 hosts lack kvm acceleration"
    assert f.phrase("engine", 1, request(engine="qemu")) == "1 host does not run engine qemu"
