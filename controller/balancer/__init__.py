"""Power management and load balancing: consolidation policies and the trace-driven simulator.

The balancer decides, once per interval, which VMs to move where so that fewer hosts stay on
without starving any VM. :mod:`.policy` puts the CloudSim baselines (THR/MAD/LR with MMT selection
and PABFD placement) and Fleetvisor's planner (:mod:`.planner`) behind one interface;
:mod:`.simulation` replays a PlanetLab day on the literature's 800-host datacenter and reports
CloudSim's metrics, which is how policies are compared (``fleetvisor simulate``, ``bench/consolidate``).
"""

from __future__ import annotations

from controller.balancer.model import Fleet, PlanningState, Snapshot
from controller.balancer.policy import BASELINES, POLICIES, Migration, Policy, UnknownPolicyError, make_policy
from controller.balancer.simulation import (
    Metrics,
    Series,
    SimulationResult,
    Trace,
    TraceError,
    format_metrics,
    format_summary,
    load_trace,
    run,
    simulate,
    standard_fleet,
)

__all__ = [
    "BASELINES",
    "POLICIES",
    "Fleet",
    "Metrics",
    "Migration",
    "PlanningState",
    "Policy",
    "Series",
    "SimulationResult",
    "Snapshot",
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
