"""VM selection: which VM leaves an overloaded host first.

Minimum Migration Time (MMT, Beloglazov & Buyya 2012) takes the VM that migrates fastest, i.e. the
one with the least RAM, since a migration lasts RAM / bandwidth; among equals, the one listed first
on the host. The caller removes it and asks again until the host is no longer overloaded. Part of
the trace evaluation (the CloudSim baselines' MMT); it imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["minimum_migration_time"]


def minimum_migration_time(vms: Sequence[int], ram_mb: npt.NDArray[np.float64]) -> int | None:
    """The VM of ``vms`` (in host order) with the least RAM, the first of equals; None if empty."""
    best: int | None = None
    best_ram = float("inf")
    for vm in vms:
        ram = float(ram_mb[vm])
        if ram < best_ram:
            best, best_ram = vm, ram
    return best
