"""The REST API's host and VM views, built from store records and live telemetry.

The types themselves are the API's contract and live in :mod:`protocols.rest`, shared with the
client library.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from controller.scheduler import SchedulerSettings, free_capacity
from controller.state.live import LiveState
from controller.state.store import HostRecord, OperationRecord, Store, Usage, VmRecord
from protocols.messages import MigrationProgress
from protocols.rest import HostLoad, HostPower, HostView, OperationView, ReportedVm, VmLoad, VmView

#: The ``selector`` parameter of the list routes (grammar: controller.common.selectors).
SELECTOR_HELP = (
    "only records that match, e.g. rack=3,tier!=db,gpu,!spare,zone in (a,b),state=running; the fields "
    "name, state, host and group (VMs) or name and state (hosts) are not labels; label:NAME names a label"
)


class Views:
    """Builds the API's host and VM views from the store, live telemetry, health and power."""

    def __init__(
        self,
        store: Store,
        live: LiveState,
        scheduler_settings: SchedulerSettings,
        health: Callable[[str], str],
        power_of: Callable[[str, HostRecord], HostPower],
    ) -> None:
        self.store = store
        self.live = live
        self.scheduler_settings = scheduler_settings
        self.health = health
        self.power_of = power_of

    def host(self, host: HostRecord, usage: Usage) -> HostView:
        """A host's record, claims, latest telemetry, health and power, as the API shows them."""
        free_vcpus, free_memory, _ = free_capacity(host, usage, self.scheduler_settings)
        sample = self.live.telemetry.get(host.host_id)
        load = None
        if sample is not None and host.online:
            seen = self.live.telemetry_seen.get(host.host_id, 0.0)
            load = HostLoad(
                cpu_util=round(sample.cpu_util, 4),
                memory_used_mib=sample.memory_used_mib,
                power_w=round(sample.power_w, 1),
                age_s=round(time.monotonic() - seen, 2),
                vms_running=len(sample.vms),
            )
        reported = self.live.inventories.get(host.host_id)
        power = self.power_of(host.host_id, host)
        return HostView(
            host_id=host.host_id,
            online=host.online,
            state_reason=host.state_reason,
            maintenance=host.maintenance,
            address=host.address,
            agent_version=host.agent_version,
            capabilities=host.capabilities,
            vms=usage.vms,
            allocated_vcpus=usage.vcpus,
            allocated_memory_mib=usage.memory_mib,
            free_vcpus=free_vcpus,
            free_memory_mib=free_memory,
            load=load,
            last_seen=host.last_seen,
            health="fenced" if host.fenced_at is not None else self.health(host.host_id),
            fenced_at=host.fenced_at,
            fenced_how=host.fenced_how,
            labels=host.labels,
            reported_vms=[ReportedVm(name=vm.name, state=vm.state) for vm in reported.vms]
            if reported
            else [],
            power_state=power.state,
            power_method=power.method,
            standby_since=power.standby_since,
            energy_kwh=power.energy_kwh,
            energy_source=power.energy_source,
            energy_since=power.energy_since,
        )

    def vm(self, vm: VmRecord, hosts_online: dict[str, bool] | None = None) -> VmView:
        """A VM's record and latest load, and whether its host is online."""
        load = None
        host_online: bool | None = None
        if vm.host_id is not None:
            if hosts_online is None:
                host = self.store.host(vm.host_id)
                host_online = host.online if host else False
            else:
                host_online = hosts_online.get(vm.host_id, False)
            sample = self.live.telemetry.get(vm.host_id)
            if sample is not None:
                for v in sample.vms:
                    if v.name == vm.name:
                        load = VmLoad(cpu_util=round(v.cpu_util, 4), dirty_mib_s=round(v.dirty_mib_s, 2))
                        break
        return VmView(
            name=vm.name,
            uuid=vm.uuid,
            state=vm.state,
            host_id=vm.host_id,
            host_online=host_online,
            spec=vm.spec,
            operation=vm.op_id,
            error=vm.error,
            load=load,
            created_at=vm.created_at,
            updated_at=vm.updated_at,
        )


def operation_view(op: OperationRecord, progress: MigrationProgress | None = None) -> OperationView:
    return OperationView(**msgspec.structs.asdict(op), progress=progress if op.state == "running" else None)
