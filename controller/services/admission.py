"""HA admission control: refuse a placement that would leave too little room to survive N host failures.

The rule, like vSphere's "host failures cluster tolerates": suppose the ``tolerate`` hosts carrying the
most HA memory fail at once. The other online hosts must have enough free memory for all of those HA
VMs, and room for the largest of them on a single host. The check runs on the host the scheduler
chose, and a refusal explains itself.
Only HA VMs are counted, because only they are restarted elsewhere.
"""

from __future__ import annotations

from collections import defaultdict

from controller.scheduler import SchedulerSettings, free_capacity
from controller.state.store import HostRecord, Usage, VmRecord
from protocols.vmspec import VmSpec


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB"


def problem(
    spec: VmSpec,
    host_id: str,
    hosts: list[HostRecord],
    usage: dict[str, Usage],
    vms: list[VmRecord],
    settings: SchedulerSettings,
    tolerate: int,
) -> str | None:
    """Why placing ``spec`` on ``host_id`` breaks the failure tolerance, or None when it does not."""
    if tolerate <= 0:
        return None
    ha_memory: dict[str, int] = defaultdict(int)
    largest: dict[str, int] = defaultdict(int)
    for vm in vms:
        if vm.spec.ha and vm.host_id is not None:
            ha_memory[vm.host_id] += vm.spec.memory_mib
            largest[vm.host_id] = max(largest[vm.host_id], vm.spec.memory_mib)
    if spec.ha:
        ha_memory[host_id] += spec.memory_mib
        largest[host_id] = max(largest[host_id], spec.memory_mib)
    online = [h for h in hosts if h.online and not h.maintenance]
    free = {}
    for h in online:
        _, memory, _ = free_capacity(h, usage.get(h.host_id, Usage()), settings)
        free[h.host_id] = memory - (spec.memory_mib if h.host_id == host_id else 0)
    failing = sorted(online, key=lambda h: (-ha_memory[h.host_id], h.host_id))[:tolerate]
    failing_ids = {h.host_id for h in failing}
    survivors = {h: m for h, m in free.items() if h not in failing_ids}
    needed = sum(ha_memory[h] for h in failing_ids)
    if needed == 0:
        return None
    spare = sum(max(0, m) for m in survivors.values())
    biggest = max((largest[h] for h in failing_ids), default=0)
    if len(online) <= tolerate or spare < needed or biggest > max(survivors.values(), default=0):
        return (
            f"admission control: placing vm {spec.name!r} on {host_id} leaves {_gib(spare)} free outside the "
            f"{tolerate} host(s) with the most HA memory ({', '.join(sorted(failing_ids))}), but their HA VMs need "
            f"{_gib(needed)} (the largest {_gib(biggest)}) to restart; add hosts or lower --ha-tolerate"
        )
    return None
