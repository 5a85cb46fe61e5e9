"""The sim hypervisor engine: deterministic simulated hosts and VMs, with an optional virtual clock.

:class:`SimDriver` is the embedded default engine and the test double for the hypervisor;
:class:`VirtualClock` lets thousands of them share simulated time in one process. Its migrations
follow :mod:`protocols.migration`, the model the planners and ``vm migrate --dry-run`` share.
"""

from hv.sim.clock import Clock, RealClock, VirtualClock
from hv.sim.driver import SimDriver
from hv.sim.host_model import HostSample

__all__ = [
    "Clock",
    "HostSample",
    "RealClock",
    "SimDriver",
    "VirtualClock",
]
