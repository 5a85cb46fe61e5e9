"""Power-aware best-fit decreasing (PABFD): where a VM should go, by the least power increase.

As CloudSim 3.0.3's ``PowerVmAllocationPolicyMigrationAbstract.findHostForVm`` codes it (Beloglazov &
Buyya, CCPE 2012): among hosts not excluded that have a core big enough for the VM's current request
and enough unreserved MIPS, and that the overload detector would not call overloaded with the VM
added (hosts with nothing reserved skip that test), pick the one whose power rises least, where the
rise is the planned power after adding the VM minus the power the host drew at the last measurement.
Ties go to the lowest host id. Callers place VMs in decreasing order of requested MIPS.

The "power before" is deliberately the measured one, not the planned one: CloudSim does it that way,
which is why a switched-off host (0 % measured) costs only its dynamic power increase here.

Part of the trace evaluation; it imports :mod:`.planning_state`, :mod:`.detectors` and
:mod:`controller.balancer.overload`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from controller.balancer.evaluation.detectors import ThresholdDetector
from controller.balancer.evaluation.planning_state import PlanningState
from controller.balancer.overload import OverloadDetector

__all__ = ["find_host", "overloaded_after"]

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


def overloaded_after(plan: PlanningState, host: int, vm: int, detector: OverloadDetector) -> bool:
    """Would ``detector`` call ``host`` overloaded with ``vm`` added to the plan?"""
    fleet = plan.fleet
    requested = (plan.requested[host] + plan.snapshot.vm_requested[vm]) / fleet.host_mips[host]
    return detector.overloaded(float(requested), plan.history_with(host, vm))


def find_host(
    plan: PlanningState,
    vm: int,
    excluded: BoolArray,
    detector: OverloadDetector,
    power_now: FloatArray,
) -> int | None:
    """The PABFD host for ``vm`` in ``plan``, or None when no host qualifies.

    ``power_now`` is each host's power at the last measurement (0 % for switched-off hosts counts as
    idle power, as in CloudSim).
    """
    fleet = plan.fleet
    r = float(plan.snapshot.vm_requested[vm])
    ok = ~excluded & (fleet.host_core_mips >= r) & (fleet.host_mips - plan.capped >= r)
    if isinstance(detector, ThresholdDetector):
        # The threshold test is cheap enough to apply to every candidate at once.
        over = (plan.requested + r) / fleet.host_mips > detector.threshold
        ok &= ~((plan.capped != 0) & over)
    candidates = np.flatnonzero(ok)
    if candidates.size == 0:
        return None
    after = (plan.capped[candidates] + r) / fleet.host_mips[candidates]
    rise = fleet.power(candidates, after) - power_now[candidates]
    if isinstance(detector, ThresholdDetector):
        return int(candidates[int(np.argmin(rise))])
    for host in candidates[np.argsort(rise, kind="stable")]:
        h = int(host)
        if plan.capped[h] != 0 and overloaded_after(plan, h, vm, detector):
            continue
        return h
    return None
