"""HostStateFilter: offline, maintenance and powered-off hosts take no VMs."""

from __future__ import annotations

from controller.scheduler import PowerSettings
from controller.scheduler.filters import HostStateFilter
from tests.controller.scheduler.support import assert_filter_agrees, fleet, record, request, view


def test_only_hosts_that_are_up_pass():
    """Online hosts pass; offline, maintenance and powered-off ones fail with their own reason."""
    f = HostStateFilter()
    assert f.host_passes(view(), request())
    assert f.reason(view(online=False), request()) == "offline"
    assert f.reason(view(maintenance=True), request()) == "maintenance"
    assert f.reason(view(online=False, maintenance=True), request()) == "offline"
    assert f.reason(view(powered_on=False, online=False), request()) == "powered_off"


def test_powered_off_hosts_may_be_chosen_when_the_power_manager_wakes_them():
    """With wake_powered_off_hosts a standby host passes, unless it is in maintenance."""
    f = HostStateFilter(PowerSettings(wake_powered_off_hosts=True))
    assert f.host_passes(view(powered_on=False, online=False), request())
    assert not f.host_passes(view(powered_on=False, maintenance=True), request())


def test_mask_and_reason_counts_agree():
    """Every combination of flags agrees between mask and host_passes, with and without waking."""
    state = fleet(
        record("up"),
        record("down", online=False),
        record("maint", maintenance=True),
        record("both", online=False, maintenance=True),
        record("standby", online=False),
        record("standby-maint", online=False, maintenance=True),
    )
    state.set_powered_on("standby", False)
    state.set_powered_on("standby-maint", False)
    for f in (HostStateFilter(), HostStateFilter(PowerSettings(wake_powered_off_hosts=True))):
        assert_filter_agrees(f, state, request())


def test_refusal_keeps_the_first_placements_words():
    """'1 offline' and '2 in maintenance', as the first placement said."""
    f = HostStateFilter()
    assert f.phrase("offline", 1, request()) == "1 offline"
    assert f.phrase("maintenance", 2, request()) == "2 in maintenance"
    assert f.phrase("powered_off", 3, request()) == "3 powered off"
