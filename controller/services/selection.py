"""Which hosts and VMs a selector (:mod:`controller.common.selectors`) picks, from the store's records.

A VM's fields are its name, state, host (empty when on none) and group (its placement group, from
its rules or its group label). A host's are its name (also ``host``) and one state word, the first
that applies of: ``fenced``, ``standby``, ``maintenance``, ``online``, ``offline``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from controller.common.selectors import Selector
from controller.scheduler.fleet_state import GROUP_LABEL
from controller.state.records import HostRecord, VmRecord


def host_state(host: HostRecord) -> str:
    """The one state word a host selector's ``state`` compares."""
    if host.fenced_at is not None:
        return "fenced"
    if host.standby_since is not None:
        return "standby"
    if host.maintenance:
        return "maintenance"
    return "online" if host.online else "offline"


def host_fields(host: HostRecord) -> Mapping[str, str]:
    return {"name": host.host_id, "host": host.host_id, "state": host_state(host)}


def vm_fields(vm: VmRecord) -> Mapping[str, str]:
    group = str(vm.hints.get("group") or vm.spec.labels.get(GROUP_LABEL, ""))
    return {"name": vm.name, "state": vm.state, "host": vm.host_id or "", "group": group}


def select_hosts(selector: Selector, hosts: Iterable[HostRecord]) -> list[HostRecord]:
    return [h for h in hosts if selector.matches(host_fields(h), h.labels)]


def select_vms(selector: Selector, vms: Iterable[VmRecord]) -> list[VmRecord]:
    return [v for v in vms if selector.matches(vm_fields(v), v.spec.labels)]
