"""What every filter is: a per-host predicate, its vector twin, and the words for why it said no.

A filter is one small class in its own module (as Nova's are). ``host_passes(host, request)`` is the
definition, pure and easy to read and test. ``mask(hosts, request)`` computes the same answer for
every host slot at once over :class:`~controller.scheduler.fleet_state.HostArrays`; the scheduler
uses it on the hot path, and tests check that both agree on random fleets.

A filter rejects a host for a *reason*: a short code (``"memory"``, ``"maintenance"``) that the
explanation counts and :meth:`HostFilter.phrase` turns into words (``"2 hosts lack memory"``). Most
filters have one reason; the host-state and capacity filters tell several apart.

``static`` filters read only what changes rarely (capabilities, labels, state flags), never claims,
so the scheduler caches their combined mask per request signature (:meth:`HostFilter.key`) until the
fleet's ``static_version`` moves.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable
from typing import ClassVar

import numpy as np

from controller.scheduler.fleet_state import BoolArray, HostArrays
from controller.scheduler.host_view import HostView
from controller.scheduler.request import PlacementRequest


def hosts_phrase(count: int, singular: str, plural: str) -> str:
    """``1 host lacks memory`` / ``2 hosts lack memory``."""
    return f"{count} host {singular}" if count == 1 else f"{count} hosts {plural}"


class HostFilter(abc.ABC):
    """Base of every filter. Subclasses set ``name`` and implement the predicate and its mask."""

    #: Short, stable name: it keys the per-filter counts of an explanation.
    name: ClassVar[str]
    #: True when the answer depends only on rarely-changing host facts (cacheable, see module doc).
    static: ClassVar[bool] = True

    def applies(self, request: PlacementRequest) -> bool:
        """Whether the request asks anything of this filter; when not, every host passes."""
        return True

    def key(self, request: PlacementRequest) -> Hashable:
        """The part of ``request`` this filter reads (static filters: part of the cache key)."""
        return None

    @abc.abstractmethod
    def host_passes(self, host: HostView, request: PlacementRequest) -> bool:
        """Whether ``host`` may take ``request``."""

    @abc.abstractmethod
    def mask(self, hosts: HostArrays, request: PlacementRequest) -> BoolArray:
        """``host_passes`` for every slot at once (slots that are not hosts may be either)."""

    def reason(self, host: HostView, request: PlacementRequest) -> str:
        """The reason code for a host this filter rejects."""
        return self.name

    def reason_counts(
        self, hosts: HostArrays, request: PlacementRequest, rejected: BoolArray
    ) -> dict[str, int]:
        """How many of the ``rejected`` slots fall under each reason code."""
        count = int(np.count_nonzero(rejected))
        return {self.name: count} if count else {}

    def phrase(self, reason: str, count: int, request: PlacementRequest) -> str:
        """Words for ``count`` hosts rejected for ``reason``, e.g. ``2 hosts lack memory``."""
        return hosts_phrase(count, f"rejected by {self.name}", f"rejected by {self.name}")

    def fix(self, reason: str, request: PlacementRequest) -> str:
        """What the user can do when this filter removed the last candidates for ``reason``."""
        return ""
