"""The sim hypervisor engine: deterministic simulated hosts and VMs, with an optional virtual clock.

:class:`SimDriver` is the embedded default engine and the test double for the hypervisor;
:class:`VirtualClock` lets thousands of them share simulated time in one process; and
:func:`precopy_estimate` is the pre-copy migration model the planners share with the engines.
"""

from hv.sim.clock import Clock, RealClock, VirtualClock
from hv.sim.engine import HostSample, SimDriver
from hv.sim.migration_model import MigrationEstimate, precopy_estimate

__all__ = [
    "Clock",
    "HostSample",
    "MigrationEstimate",
    "RealClock",
    "SimDriver",
    "VirtualClock",
    "precopy_estimate",
]
