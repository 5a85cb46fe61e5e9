"""What the REST API returns: msgspec Structs built from store records and live telemetry.

These are the API's own contract (documented in the OpenAPI file), separate from the bus messages,
so the wire and the API can evolve at their own pace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec

from controller.scheduler import Explanation, SchedulerSettings, SchedulingHints, free_capacity
from controller.services.power import HostPower
from controller.state.live import LiveState
from controller.state.store import HostRecord, OperationRecord, Store, Usage, VmRecord
from protocols.messages import Capabilities, MigrationProgress
from protocols.migration import MigrationPolicy
from protocols.vmspec import Label, VmSpec, VmSpecInput

#: The ``selector`` parameter of the list routes (grammar: controller.common.selectors).
SELECTOR_HELP = (
    "only records that match, e.g. rack=3,tier!=db,gpu,!spare,zone in (a,b),state=running; the fields "
    "name, state, host and group (VMs) or name and state (hosts) are not labels; label:NAME names a label"
)


class HostLoad(msgspec.Struct, frozen=True, kw_only=True):
    cpu_util: float
    memory_used_mib: int
    power_w: float
    age_s: float
    vms_running: int


class ReportedVm(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    state: str


class HostView(msgspec.Struct, frozen=True, kw_only=True):
    host_id: str
    online: bool
    state_reason: str
    maintenance: bool
    address: str
    agent_version: str
    capabilities: Capabilities
    vms: int
    allocated_vcpus: int
    allocated_memory_mib: int
    free_vcpus: int
    free_memory_mib: int
    load: HostLoad | None
    last_seen: float
    #: Labels the scheduler matches on: the agent's, overridden by the operator's.
    labels: dict[str, str] = {}
    #: The health the failure detector gives the host: up, suspect, failed or offline; "fenced" once its
    #: VMs are confirmed stopped (by HA's fencing, or an operator's ``host confirm-down``).
    health: str = "up"
    fenced_at: float | None = None
    fenced_how: str = ""
    #: What the host itself last reported running (the store may know better during operations).
    reported_vms: list[ReportedVm] = []
    #: ``on``, ``standby`` (switched off by the power manager, not placeable) or ``powering-on``.
    power_state: str = "on"
    #: The host's power methods in the order they are tried (``ipmi+wol``...), if it has any.
    power_method: str | None = None
    standby_since: float | None = None
    #: Energy counted since ``energy_since``, in kWh (kept across controller restarts, which are not
    #: counted), and the source of its latest sample: ``measured`` (the BMC), ``model`` (the host's
    #: power model at its CPU use) or ``standby``.
    energy_kwh: float = 0.0
    energy_source: str | None = None
    energy_since: float | None = None


class VmLoad(msgspec.Struct, frozen=True, kw_only=True):
    cpu_util: float
    dirty_mib_s: float


class VmView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    uuid: str
    state: str
    host_id: str | None
    host_online: bool | None
    spec: VmSpec
    operation: str | None
    error: str
    load: VmLoad | None
    created_at: float
    updated_at: float


class OperationView(msgspec.Struct, frozen=True, kw_only=True):
    op_id: str
    kind: str
    vm: str
    host_id: str | None
    state: str
    error: str
    params: dict[str, Any]
    deadline: float
    created_at: float
    updated_at: float
    #: For a migration under way: the source agent's latest account of it.
    progress: MigrationProgress | None = None
    #: The bulk action that started this operation ("" for none).
    parent: str = ""


class OperationPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of operations, newest first; ``next`` fetches the following page (None: the last)."""

    operations: list[OperationView]
    next: str | None = None


class MigrateRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Move a running VM: to a host (the scheduler chooses when omitted), under a policy."""

    to: str | None = None
    policy: MigrationPolicy = MigrationPolicy()
    #: Override the VM's placement rules (group, labels, pins); needs a ``reason``, which is recorded.
    force: bool = False
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class EvacuateRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Move every running VM off a host, in waves, under one policy."""

    policy: MigrationPolicy = MigrationPolicy()


class CreateVmRequest(VmSpecInput, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The create body: a VM spec, plus where it may go and how many to make."""

    scheduling: SchedulingHints | None = None
    #: Make this many VMs named ``<name>-1..N``, planned as a whole.
    count: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class CreateVmResponse(msgspec.Struct, frozen=True, kw_only=True):
    vm: VmView
    operation: OperationView
    #: Why this host: filters, rejections, top candidates (with ``?explain=true``).
    explanation: Explanation | None = None


class CreateBatchResponse(msgspec.Struct, frozen=True, kw_only=True):
    vms: list[CreateVmResponse]


class PlanResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A dry run: where the VM would go and why; nothing was claimed."""

    vm: str
    host_id: str
    explanation: Explanation


class BatchPlanResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A dry run of ``count`` VMs: where each would go, planned as a whole; nothing was claimed."""

    vms: list[PlanResponse]


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str
    detail: dict[str, Any] = {}


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    error: ErrorDetail


class HostUpdate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Operator settings of a host. A label set to null is removed."""

    labels: dict[Label, str | None] | None = None
    maintenance: bool | None = None
    #: Enter maintenance even when this is the last host that can hold the fleet's HA VMs.
    force: bool = False


class ConfirmDownResponse(msgspec.Struct, frozen=True, kw_only=True):
    """What ``host confirm-down`` did: the host is fenced, and this many HA restarts began."""

    host: HostView
    restarts: int


class ForgetResponse(msgspec.Struct, frozen=True, kw_only=True):
    """What ``host forget`` removed: the host and the records of the VMs it held."""

    host_id: str
    vms_removed: list[str]


class StopRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    force: bool = False
    timeout_s: float = 30.0  # bounded in the route, with an error that says what to do


class BulkRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /actions``: one action on every VM or host the selector picks (docs/operations.md)."""

    #: VMs: start, stop, pause, resume, reboot, delete, migrate; hosts: maintenance, label, power.
    action: Annotated[str, msgspec.Meta(max_length=32)]
    #: The grammar of docs/selectors.md; "" picks every VM (or host).
    selector: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    max_parallel: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    #: End the action once this many targets failed (0: try every target).
    stop_after: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    #: Only say what the selector picks; start nothing.
    dry_run: bool = False
    #: stop: power off at once, or the graceful timeout; maintenance: on or off, and force (past the
    #: HA room check); power: on, or off (standby); migrate: the target host (None: the scheduler's
    #: choice per VM).
    force: bool = False
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    on: bool = True
    to: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    #: migrate: the policy (None: the defaults).
    policy: MigrationPolicy | None = None
    #: label: the operator labels to set (a null value removes one).
    labels: dict[Label, str | None] | None = None


class BulkPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A dry run's answer: what the action would act on, in the order it would."""

    action: str
    selector: str
    targets: list[str]


class RollingRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /rolling-maintenance``: the hosts a selector picks through maintenance in turn."""

    #: The grammar of docs/selectors.md, over hosts; "" picks every host.
    selector: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    #: Hosts per wave.
    max_parallel: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    #: Migrate the VMs that left a host back to it once it is out of maintenance.
    return_vms: bool = False
    #: "continue": wait for ``POST /operations/{id}/continue`` on each host; "none": no operator step.
    step: Literal["continue", "none"] = "continue"
    #: How long a host's agent may take to come back healthy after the step.
    agent_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 900.0
    #: The evacuations' policy; None: the defaults, at the whole link budget of a host
    #: (``host_link_mib_s``), since the roll's sends are what the link is for.
    policy: MigrationPolicy | None = None
    #: Only say which hosts, in which waves; start nothing.
    dry_run: bool = False


class RollingPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A dry run's answer: the hosts, wave by wave, in the order the roll takes them."""

    selector: str
    waves: list[list[str]]


class ContinueRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /operations/{id}/continue``: the operator's step on a host of a roll is over."""

    host: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    #: False: the step failed; the host stays in maintenance and the roll stops.
    ok: bool = True
    #: What the step did, or why it failed (kept in the roll's progress and its events).
    message: Annotated[str, msgspec.Meta(max_length=2000)] = ""


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
