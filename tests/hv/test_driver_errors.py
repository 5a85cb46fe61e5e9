"""The engines' shared refusals: every state, including a migration's incoming copy, gets a fix."""

from __future__ import annotations

import pytest

from hv.driver import STATE_ORDER, InvalidState, require_state
from protocols.messages import VmPowerState


@pytest.mark.parametrize("state", STATE_ORDER)
def test_every_state_can_be_required_alone_and_the_refusal_names_it(state: VmPowerState):
    """require_state with one allowed state refuses another with a message naming both and a fix."""
    other: VmPowerState = "running" if state != "running" else "stopped"
    with pytest.raises(InvalidState) as caught:
        require_state("web", "h1", other, "start", [state])
    assert f"is {other}" in str(caught.value) and f"needs it {state}" in str(caught.value)


def test_an_incoming_copy_is_refused_with_the_migration_fix_not_start_it_first():
    """Start on an incoming VM says to wait for the migration or discard the copy."""
    with pytest.raises(InvalidState) as caught:
        require_state("web", "h1", "incoming", "start", ["stopped", "defined"])
    message = str(caught.value)
    assert "live migration" in message and "destroy and undefine" in message
    assert "start it first" not in message
