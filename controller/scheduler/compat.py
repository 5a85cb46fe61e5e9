"""The drop-in for ``controller.placement.place``: same arguments, same result shapes, new scheduler.

``place(spec, hosts, usage, settings)`` builds a fleet state from the records on every call, as the
first placement scanned them on every call, and answers with a :class:`Placement` (``host_id``,
``candidates``) or a :class:`~controller.scheduler.explanation.NoValidHost` (``reason``/``message``,
``rejected``) whose texts keep the first placement's phrasings. It suits the controller until it
keeps a :class:`~controller.scheduler.fleet_state.FleetState` of its own; at fleet scale, keep one
and call :class:`~controller.scheduler.scheduler.Scheduler` directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from controller.scheduler.explanation import Decision, NoValidHost
from controller.scheduler.fleet_state import FleetState
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest, SchedulingHints
from controller.scheduler.scheduler import Scheduler
from controller.scheduler.settings import CapacitySettings, SchedulerSettings
from controller.store import HostRecord, Usage
from protocols.vmspec import VmSpec


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    host_id: str
    free_memory_mib: int
    free_vcpus: int
    score: float


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """The chosen host, the best candidates, and the full decision behind them."""

    host_id: str
    candidates: list[Candidate]
    decision: Decision


def place(
    spec: VmSpec,
    hosts: Sequence[HostRecord],
    usage: Mapping[str, Usage],
    settings: SchedulerSettings | None = None,
    *,
    hints: SchedulingHints | None = None,
    labels: Mapping[str, Mapping[str, str]] | None = None,
) -> Placement | NoValidHost:
    """Choose a host for ``spec``, or explain why none fits (``controller.placement.place``'s shape).

    Raises:
        UnknownPolicyError: ``hints`` name a policy the settings do not define.
    """
    config = settings or SchedulerSettings()
    state = FleetState.from_records(hosts, usage, labels, capacity=config.capacity)
    decision = Scheduler(state, config).select(PlacementRequest.from_spec(spec, hints))
    if decision.refusal is not None:
        return decision.refusal
    assert decision.host_id is not None
    candidates = [
        Candidate(
            host_id=c.host_id, free_memory_mib=c.free_memory_mib, free_vcpus=c.free_vcpus, score=c.score
        )
        for c in decision.explanation.top
    ]
    return Placement(host_id=decision.host_id, candidates=candidates, decision=decision)


def free_capacity(
    host: HostRecord, used: Usage, settings: CapacitySettings | SchedulerSettings
) -> tuple[int, int, int]:
    """(free vCPUs, free MiB, free GiB of disk) on ``host`` after its claims (as ``placement.free_capacity``)."""
    capacity = settings.capacity if isinstance(settings, SchedulerSettings) else settings
    view = HostView.from_record(host, used)
    return view.free_vcpus(capacity), view.free_memory_mib(capacity), view.free_disk_gib(capacity)
