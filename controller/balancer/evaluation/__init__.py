"""Offline trace evaluation of consolidation policies: the CloudSim baselines, a simulated day, a plot.

The live controller never imports this package. It is how policies are compared
(``fleetvisor simulate``, ``bench/consolidate``): :mod:`.simulation` replays a PlanetLab day
(:mod:`.trace`) on the literature's 800-host datacenter, runs every move of Fleetvisor's planner
through the live scheduler (:mod:`.gate`) and reports CloudSim's metrics (:mod:`.metrics`), which
:mod:`.plot` draws (matplotlib, an optional extra). :mod:`.policy` puts the CloudSim baselines
(THR/MAD/LR detectors from :mod:`.detectors`, MMT selection from :mod:`.selection` and PABFD
placement from :mod:`.placement` on a :mod:`.planning_state`) and Fleetvisor's planner behind one
interface.

It imports the live balancer (:mod:`controller.balancer.model`, ``.overload``, ``.planner``,
``.power_model``) and, for the gate, the scheduler and the store's record types; nothing below it
imports it back.
"""

from __future__ import annotations

from controller.balancer.evaluation.metrics import (
    Metrics,
    Series,
    SimulationResult,
    format_metrics,
    format_summary,
)
from controller.balancer.evaluation.planning_state import PlanningState
from controller.balancer.evaluation.policy import (
    BASELINES,
    POLICIES,
    CloudSimPolicy,
    Policy,
    UnknownPolicyError,
    make_policy,
)
from controller.balancer.evaluation.simulation import run, simulate
from controller.balancer.evaluation.trace import Trace, TraceError, load_trace, standard_fleet

__all__ = [
    "BASELINES",
    "POLICIES",
    "CloudSimPolicy",
    "Metrics",
    "PlanningState",
    "Policy",
    "Series",
    "SimulationResult",
    "Trace",
    "TraceError",
    "UnknownPolicyError",
    "format_metrics",
    "format_summary",
    "load_trace",
    "make_policy",
    "run",
    "simulate",
    "standard_fleet",
]
