"""What every weigher is: a raw number per host, which the framework normalises and multiplies.

As in Nova, a weigher knows nothing of other weighers or of scale: ``weigh_host(host, request)``
returns a raw number (free MiB, a negative cost), and ``weigh(hosts, request)`` the same number for
every slot at once. The scheduler rescales each weigher's numbers to 0..1 over the hosts that passed
the filters (:func:`normalise`; all equal: all 0) and adds them up times the policy's multiplier for that weigher. A
negative multiplier turns "prefer more" into "prefer less", which is how ``pack`` and ``spread``
differ.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from controller.scheduler.fleet_state import FloatArray, HostArrays, IntArray
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import CapacitySettings


class HostWeigher(abc.ABC):
    """Base of every weigher. Subclasses set ``name`` and implement both forms."""

    #: Short, stable name: policies give multipliers by it, explanations report scores by it.
    name: ClassVar[str]

    def applies(self, request: PlacementRequest) -> bool:
        """Whether this weigher has anything to say about ``request`` (else it is skipped)."""
        return True

    @abc.abstractmethod
    def weigh_host(self, host: HostView, request: PlacementRequest) -> float:
        """The raw weight of one host (higher is better before the multiplier's sign)."""

    @abc.abstractmethod
    def weigh(self, hosts: HostArrays, request: PlacementRequest) -> FloatArray | IntArray:
        """``weigh_host`` for every slot at once (slots that are not hosts may hold anything finite)."""


#: Spreads below this fraction of the values' magnitude count as ties: rescaling them to 0..1 would
#: turn floating-point rounding into a preference.
TIE_TOLERANCE = 1e-9


def spread_of(low: float, high: float) -> float:
    """``high - low``, or 0.0 when that is within rounding of a tie (see ``TIE_TOLERANCE``)."""
    spread = high - low
    if not spread > TIE_TOLERANCE * max(abs(low), abs(high), 1.0) or math.isinf(spread):
        return 0.0
    return spread


def normalise(values: FloatArray | IntArray, multiplier: float = 1.0) -> FloatArray | None:
    """``values`` (one per candidate) rescaled to span 0..1 and times ``multiplier``; None when all tie.

    The multiplier is folded into the one scaling pass, which matters on the hot path.
    """
    low = float(values.min())
    spread = spread_of(low, float(values.max()))
    if not spread:
        return None
    scaled: FloatArray = np.subtract(values, low, dtype=np.float64)
    scaled *= multiplier / spread
    return scaled


def normalise_values(values: Sequence[float]) -> list[float]:
    """The per-host form of :func:`normalise`, for reference and tests."""
    if not values:
        return []
    low, high = min(values), max(values)
    spread = spread_of(low, high)
    if not spread:
        return [0.0] * len(values)
    return [(v - low) * (1.0 / spread) for v in values]


def load_after(
    hosts: HostArrays, request: PlacementRequest, capacity: CapacitySettings
) -> tuple[FloatArray, FloatArray]:
    """(vCPU, memory) share of what each slot offers that would be claimed with ``request`` on it.

    Fresh arrays the caller may modify in place.
    """
    if capacity == hosts.capacity:
        cpu = hosts.inv_cap_vcpus * float(request.vcpus)
        cpu += hosts.load_vcpus
        memory = hosts.inv_cap_memory_mib * float(request.memory_mib)
        memory += hosts.load_memory_mib
        return cpu, memory
    cap_vcpus, cap_memory, _ = hosts.capacity_under(capacity)
    cpu = (hosts.used_vcpus + request.vcpus) / np.maximum(cap_vcpus, 1)
    memory = (hosts.used_memory_mib + request.memory_mib) / np.maximum(cap_memory, 1)
    return cpu, memory


def host_load_after(
    host: HostView, request: PlacementRequest, capacity: CapacitySettings
) -> tuple[float, float]:
    """The per-host form of :func:`load_after`."""
    cpu = (host.used_vcpus + request.vcpus) / max(capacity.vcpus(host.cores), 1)
    memory = (host.used_memory_mib + request.memory_mib) / max(capacity.memory_mib(host.memory_mib), 1)
    return cpu, memory
