"""Minimum Migration Time: the least RAM leaves first, the first of equals in host order."""

from __future__ import annotations

import numpy as np

from controller.balancer.evaluation.selection import minimum_migration_time

RAM = np.array([1740.0, 613.0, 870.0, 613.0])


def test_least_ram_goes_first():
    """Of 1740, 613 and 870 MB the 613 MB VM is chosen."""
    assert minimum_migration_time([0, 1, 2], RAM) == 1


def test_ties_go_to_the_vm_listed_first_on_the_host():
    """Two 613 MB VMs: the one earlier in the host's order wins."""
    assert minimum_migration_time([3, 0, 1], RAM) == 3
    assert minimum_migration_time([1, 3], RAM) == 1


def test_an_empty_host_has_nothing_to_give():
    """No VMs, no choice."""
    assert minimum_migration_time([], RAM) is None
