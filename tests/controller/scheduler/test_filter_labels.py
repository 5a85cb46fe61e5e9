"""LabelsFilter: require={"zone": "a"} admits only hosts labelled exactly so."""

from __future__ import annotations

from controller.scheduler.filters import LabelsFilter
from tests.controller.scheduler.support import assert_filter_agrees, fleet, record, request, view


def test_every_required_label_must_match():
    """zone=a passes a host in zone a and fails one in zone b or without a zone."""
    f = LabelsFilter()
    req = request(require_labels={"zone": "a"})
    assert f.host_passes(view(labels={"zone": "a", "rack": "r1"}), req)
    assert not f.host_passes(view(labels={"zone": "b"}), req)
    assert not f.host_passes(view(), req)
    assert not f.applies(request())


def test_codes_agree_with_host_passes_for_unknown_keys_and_values():
    """Known and unknown keys and values agree between the mask and host_passes."""
    state = fleet(
        record("a1"),
        record("a2"),
        record("b1"),
        record("none"),
        labels={"a1": {"zone": "a", "rack": "r1"}, "a2": {"zone": "a", "rack": "r2"}, "b1": {"zone": "b"}},
    )
    for labels in ({"zone": "a"}, {"zone": "a", "rack": "r2"}, {"zone": "c"}, {"pool": "gpu"}):
        assert_filter_agrees(LabelsFilter(), state, request(require_labels=labels))


def test_relabelling_a_host_changes_what_passes():
    """set_labels takes effect at once, and the old value no longer matches."""
    state = fleet(record("h1"), labels={"h1": {"zone": "a"}})
    state.set_labels("h1", {"zone": "b"})
    assert not LabelsFilter().mask(state, request(require_labels={"zone": "a"}))[0]
    assert LabelsFilter().mask(state, request(require_labels={"zone": "b"}))[0]


def test_refusal_names_the_labels():
    """The reason names the labels asked for."""
    assert (
        LabelsFilter().phrase("labels", 1, request(require_labels={"zone": "a"}))
        == "1 host lacks label zone=a"
    )
