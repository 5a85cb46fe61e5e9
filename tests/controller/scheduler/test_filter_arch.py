"""ArchFilter: a host runs its own architecture and the guest architectures it lists."""

from __future__ import annotations

from controller.scheduler.filters import ArchFilter
from tests.controller.scheduler.support import assert_filter_agrees, fleet, record, request, view


def test_native_and_listed_guest_architectures_pass():
    """An x86_64 host listing i386 runs both, and not aarch64."""
    host = view(arch="x86_64", guest_arches=["x86_64", "i386"])
    f = ArchFilter()
    assert f.host_passes(host, request(arch="x86_64"))
    assert f.host_passes(host, request(arch="i386"))
    assert not f.host_passes(host, request(arch="aarch64"))


def test_mask_agrees_including_an_architecture_no_host_has():
    """The bitset mask agrees with host_passes, and an unknown architecture matches no host."""
    state = fleet(
        record("x", arch="x86_64", guest_arches=["x86_64", "i386"]),
        record("arm", arch="aarch64"),
    )
    for arch in ("x86_64", "i386", "aarch64", "s390x"):
        assert_filter_agrees(ArchFilter(), state, request(arch=arch))
    assert not ArchFilter().mask(state, request(arch="s390x")).any()


def test_refusal_keeps_the_first_placements_words():
    """The reason reads 'cannot run x86_64 guests', as the first placement's did."""
    assert ArchFilter().phrase("arch", 1, request(arch="x86_64")) == "1 host cannot run x86_64 guests"
