"""free_capacity: a host's free room from its store record, as admission and the API's views read it."""

from __future__ import annotations

from controller.scheduler import CapacitySettings, free_capacity
from controller.state.store import Usage
from tests.controller.scheduler.support import record


def test_free_capacity_matches_the_first_placements():
    """free_capacity returns (vCPUs, MiB, GiB) free after claims, as views.py expects."""
    host = record("h1", accel="sim", engine="sim", disk_gib=0, cores=2, memory_mib=4096)
    assert free_capacity(host, Usage(vcpus=1, memory_mib=1024), CapacitySettings()) == (
        7,
        4096 - 512 - 1024,
        0,
    )
