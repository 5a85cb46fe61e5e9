"""CpuFeaturesFilter: a VM that needs CPU features (``vmx``, ``avx2``) goes only where all of them are.

Features are the host's ``Capabilities.cpu_features`` (its /proc/cpuinfo flags); on the hot path they
are bitsets, so one request tests every host with a few integer ANDs.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import numpy as np

from controller.scheduler.filters.base import HostFilter, hosts_phrase
from controller.scheduler.fleet_state import BoolArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest


class CpuFeaturesFilter(HostFilter):
    name: ClassVar[str] = "cpu_features"

    def applies(self, request: PlacementRequest) -> bool:
        return bool(request.required_features)

    def key(self, request: PlacementRequest) -> Hashable:
        return frozenset(request.required_features)

    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        return host.cpu_features.issuperset(request.required_features)

    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        words = hosts.feature_words(request.required_features)
        if words is None:
            return np.zeros(len(hosts.present), dtype=np.bool_)
        out = np.ones(len(hosts.present), dtype=np.bool_)
        for word, bits in words:
            out &= (hosts.feature_bits[:, word] & bits) == bits
        return out

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        wanted = ", ".join(sorted(request.required_features))
        noun = "feature" if len(request.required_features) == 1 else "features"
        return hosts_phrase(count, f"lacks CPU {noun} {wanted}", f"lack CPU {noun} {wanted}")

    def fix(self, reason: str, request: PlacementRequest) -> str:
        return "drop the CPU feature rule, or add a host whose CPU has them"
