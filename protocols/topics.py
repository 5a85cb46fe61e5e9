"""Topic names under ``fv/v1``. The major wire version is part of every topic.

Each host owns the subtree ``fv/v1/host/<host_id>/``; the broker ACL lets a host publish only there,
and only the controller publish to ``.../cmd``.

=============================  =====  ========  ============================================
topic                          QoS    retained  payload
=============================  =====  ========  ============================================
``fv/v1/host/H/state``         1      yes       HostState (Last Will: online=False)
``fv/v1/host/H/inventory``     1      yes       HostInventory (the hello)
``fv/v1/host/H/telemetry``     0      no        HostTelemetry
``fv/v1/host/H/events``        1      no        VmEvent
``fv/v1/host/H/cmd``           1      no        Command, AgentRefused (controller -> agent)
``fv/v1/host/H/reply``         1      no        Reply (agent -> controller)
=============================  =====  ========  ============================================
"""

from __future__ import annotations

from typing import Final, Literal

from protocols.vmspec import HOST_ID_RE

PREFIX: Final = "fv/v1"

Family = Literal["state", "inventory", "telemetry", "events", "cmd", "reply"]
FAMILIES: Final[tuple[Family, ...]] = ("state", "inventory", "telemetry", "events", "cmd", "reply")


def host_topic(host_id: str, family: Family) -> str:
    """The topic of ``family`` in ``host_id``'s subtree."""
    return f"{PREFIX}/host/{host_id}/{family}"


def all_hosts(family: Family) -> str:
    """A subscription filter matching ``family`` for every host."""
    return f"{PREFIX}/host/+/{family}"


def host_subtree(host_id: str) -> str:
    """Filter for everything a host may publish (used by the ACL generator)."""
    return f"{PREFIX}/host/{host_id}/#"


def parse(topic: str) -> tuple[str, Family] | None:
    """Split a host topic into (host_id, family); None for anything that is not one of ours."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "fv" or parts[1] != "v1" or parts[2] != "host":
        return None
    family = parts[4]
    if family not in FAMILIES or not HOST_ID_RE.fullmatch(parts[3]):
        return None
    return parts[3], family
