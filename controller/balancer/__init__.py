"""Power management and load balancing: the live consolidation planner and its model of the fleet.

The balancer decides, once per interval, which VMs to move where so that fewer hosts stay on
without starving any VM. The live controller (``controller.services.power``) uses three modules:
:mod:`.model` (the fleet, a snapshot per decision, a migration), :mod:`.overload` (the predictive
overload detector) and :mod:`.planner` (Fleetvisor's planner); :mod:`.power_model` holds the
SPECpower tables they price power with.

The offline trace evaluation (the CloudSim baselines, the PlanetLab simulation and its plot) lives in
:mod:`.evaluation`, which imports these modules and is never imported by them or by the live
controller. This package imports only its own modules.
"""

from __future__ import annotations

from controller.balancer.model import Fleet, Migration, Snapshot
from controller.balancer.overload import OverloadDetector, PredictiveDetector
from controller.balancer.planner import FleetvisorPolicy, FleetvisorSettings, MigrationCostModel

__all__ = [
    "Fleet",
    "FleetvisorPolicy",
    "FleetvisorSettings",
    "Migration",
    "MigrationCostModel",
    "OverloadDetector",
    "PredictiveDetector",
    "Snapshot",
]
