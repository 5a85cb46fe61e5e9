"""Placement at fleet scale: filters remove hosts, weighers rank the rest, every decision explains itself.

The model is Nova's: one filter per module (:mod:`.filters`) with a pure ``host_passes`` and a
vectorised ``mask`` over numpy columns; one weigher per module (:mod:`.weighers`) returning raw
numbers that the scheduler normalises to 0..1 and multiplies by a named policy's multipliers
(``pack``, ``spread``, ``power-saving``). :class:`FleetState` holds the fleet as per-host columns,
updated in O(1) per claim, and knows nothing of SQLite, so the controller and a trace-driven
simulator both use it.

Typical use in the controller (no await between select, claim and the store write)::

    decision = scheduler.select(PlacementRequest.from_spec(spec, hints))
    if decision.refusal is not None:
        raise ApiError(409, "no_valid_host", decision.refusal.message)
    claim = scheduler.claim(decision, request)
    ...persist the VM on decision.host_id; on failure: state.release(spec.name, decision.host_id)

The package re-exports its modules' public names; no module of it imports one that imports it back
(the batch planner reaches the scheduler only through :class:`~.batch.RequestScheduler`).
"""

from __future__ import annotations

from controller.scheduler.evaluation import Evaluation
from controller.scheduler.explanation import BatchDecision, Decision, NoValidHost
from controller.scheduler.fleet_state import (
    GROUP_LABEL,
    Claim,
    FleetState,
    FleetStateError,
    HostArrays,
    OverbookError,
)
from controller.scheduler.host_view import HostView, free_capacity
from controller.scheduler.request import PlacementRequest
from controller.scheduler.scheduler import Scheduler
from controller.scheduler.settings import (
    POLICIES,
    CapacitySettings,
    MigrationSettings,
    PowerSettings,
    SchedulerSettings,
    UnknownPolicyError,
)
from protocols.rest import Explanation, GroupPolicy, SchedulingHints, ScoredHost

__all__ = [
    "GROUP_LABEL",
    "POLICIES",
    "BatchDecision",
    "CapacitySettings",
    "Claim",
    "Decision",
    "Evaluation",
    "Explanation",
    "FleetState",
    "FleetStateError",
    "GroupPolicy",
    "HostArrays",
    "HostView",
    "MigrationSettings",
    "NoValidHost",
    "OverbookError",
    "PlacementRequest",
    "PowerSettings",
    "Scheduler",
    "SchedulerSettings",
    "SchedulingHints",
    "ScoredHost",
    "UnknownPolicyError",
    "free_capacity",
]
