"""The REST API's contract: what ``/api/v1`` takes and answers, as msgspec Structs.

The controller's routes encode these and the client library (:mod:`controller.client`) decodes
them, so a script, the CLI and the OpenAPI document see one definition. They are the API's own
types, separate from the bus messages (:mod:`protocols.messages`), so the wire and the API can
evolve at their own pace. Requests forbid unknown fields (a typo is an error); answers do not, so
an older client keeps working against a newer controller.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from protocols.messages import Capabilities, LabelValue, MigrationProgress
from protocols.migration import MigrationPolicy, MigrationPrediction
from protocols.vmspec import HostId, Label, VmSpec, VmSpecInput

GroupPolicy = Literal["affinity", "anti-affinity", "soft-affinity", "soft-anti-affinity"]

GroupName = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,63}\Z", description="letters, digits, '.', '_', '-'")
]
CpuFeature = Annotated[
    str, msgspec.Meta(pattern=r"^[a-z0-9_.-]{1,32}\Z", description="a CPU flag as /proc/cpuinfo names it")
]
PolicyName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9-]{1,32}\Z", description="e.g. pack, spread")]


class SchedulingHints(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a VM may and should go, as an operator says it on create (``--group``, ``--require``...).

    ``group_policy`` defaults to ``anti-affinity`` when a group is named: the usual reason to name a
    group is to keep replicas apart.
    """

    group: GroupName | None = None
    group_policy: GroupPolicy | None = None
    #: Host labels that must match exactly, e.g. ``{"zone": "a"}``.
    require: dict[Label, LabelValue] = {}
    #: Only these hosts may take the VM, now and at every later move (empty: any host).
    hosts: list[HostId] = []
    #: Place the VM on this host now. Unlike ``hosts`` it is not kept: later moves may take the VM
    #: wherever its other rules allow (like Nova's forced host at boot).
    start_on: HostId | None = None
    avoid_hosts: list[HostId] = []
    required_features: list[CpuFeature] = []
    accel: Literal["sim", "kvm", "tcg"] | None = None
    engine: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_-]{1,32}\Z")] | None = None
    policy: PolicyName | None = None
    #: In a batch (``--count``), place what fits instead of failing the whole batch.
    best_effort: bool = False

    def __post_init__(self) -> None:
        if self.group_policy is not None and self.group is None:
            raise ValueError("group_policy needs a group; name one with group=...")
        overlap = set(self.hosts) & set(self.avoid_hosts)
        if overlap:
            raise ValueError(f"hosts {sorted(overlap)} are both required and avoided; keep them in one list")
        if self.start_on is not None and (
            self.start_on in self.avoid_hosts or (self.hosts and self.start_on not in self.hosts)
        ):
            raise ValueError(
                f"start_on {self.start_on!r} is avoided or not among the allowed hosts; start it on one of those"
            )


class ScoredHost(msgspec.Struct, frozen=True, kw_only=True):
    """One candidate: its total score and each weigher's share (normalised weight times multiplier)."""

    host_id: str
    score: float
    weights: dict[str, float]
    free_vcpus: int
    free_memory_mib: int


class Explanation(msgspec.Struct, frozen=True, kw_only=True):
    """Why a decision came out as it did."""

    policy: str
    #: Hosts in the fleet when the decision was made.
    hosts: int
    #: Hosts each applied filter removed, in the order the filters ran.
    filtered: dict[str, int]
    #: The rejected hosts by reason code (``memory``, ``offline``, ``arch``...); sums to hosts - candidates.
    rejected: dict[str, int]
    #: Hosts that passed every filter.
    candidates: int
    #: The best candidates, best first.
    top: list[ScoredHost] = []


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One fleet event, as the store keeps it and ``/events`` serves it; ``seq`` orders them."""

    seq: int
    ts: float
    type: str
    host_id: str
    vm: str
    op_id: str
    message: str


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


class VmUpdate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``PATCH /vms/{name}``: the operator's labels (a null value removes one; ``fleetvisor.io/`` keys
    are the controller's own).
    """

    labels: dict[Label, Annotated[str, msgspec.Meta(max_length=256)] | None] = {}


class StopRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    force: bool = False
    timeout_s: float = 30.0  # bounded in the route, with an error that says what to do


class BulkRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /actions``: one action on every VM or host the selector picks (docs/operations.md)."""

    #: VMs: start, stop, pause, resume, reboot, delete, migrate, label; hosts: maintenance, label, power.
    action: Annotated[str, msgspec.Meta(max_length=32)]
    #: What the selector picks: "vm" or "host"; None: the action's own (label: hosts, for
    #: compatibility; give "vm" to label VMs).
    kind: Literal["vm", "host"] | None = None
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


# -- enrolment ---------------------------------------------------------------------------------------

#: The longest a join token may live: a week.
MAX_JOIN_TOKEN_TTL_S = 7 * 86400.0


class PendingHost(msgspec.Struct, frozen=True, kw_only=True):
    """A host that asked to join and waits for ``host accept``."""

    host_id: str
    boot_id: str
    address: str
    cores: int
    memory_mib: int
    #: Why it waits (no join token, an unknown token...).
    reason: str
    first_seen: float
    updated_at: float


class AcceptedHost(msgspec.Struct, frozen=True, kw_only=True):
    host_id: str
    accepted: bool = True


class JoinTokenRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: The host id the token enrols; empty: any new host id.
    host_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_JOIN_TOKEN_TTL_S)] = 3600.0


class JoinToken(msgspec.Struct, frozen=True, kw_only=True):
    """A one-time join token: shown once, for ``fleetvisor agent --join-token``."""

    token: str
    host_id: str
    expires_at: float


# -- live migration ----------------------------------------------------------------------------------


class MigrationPlan(msgspec.Struct, frozen=True, kw_only=True):
    """The ``--dry-run`` answer: where the VM would go and what the migration would take."""

    vm: str
    source: str
    target: str | None
    policy: MigrationPolicy
    dirty_mib_s: float
    prediction: MigrationPrediction | None
    #: Why that target (or why none): the scheduler's explanation.
    explanation: Any = None


# -- power ---------------------------------------------------------------------------------------------

AutomationLevel = Literal["manual", "recommend", "auto"]


class PlannedMove(msgspec.Struct, frozen=True, kw_only=True):
    """One migration of a plan, and why."""

    vm: str
    source: str
    target: str
    #: ``relieve``: the source is (about to be) overloaded; ``consolidate``: the source is emptied.
    kind: Literal["relieve", "consolidate"]
    memory_mib: int
    reason: str


class PlannedPowerAction(msgspec.Struct, frozen=True, kw_only=True):
    """One power action of a plan, and why."""

    host_id: str
    action: Literal["power_on", "standby"]
    reason: str


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """A recommendation: the moves and power actions of one round, each with its reason."""

    round: int
    computed_at: float
    mode: str
    #: Fleet CPU demand now and its forecast for the next round, and the CPU powered on, in cores.
    demand_cores: float
    forecast_cores: float
    powered_on_cores: float
    moves: list[PlannedMove] = []
    power: list[PlannedPowerAction] = []
    #: What the plan leaves alone and why (cooldown, budget, a host nobody could wake...).
    notes: list[str] = []
    summary: str = ""


class StepResult(msgspec.Struct, frozen=True, kw_only=True):
    """What became of one step of an executed plan."""

    kind: Literal["move", "power_on", "standby"]
    subject: str
    ok: bool
    detail: str
    op_id: str | None = None
    #: Why a step failed, for callers to branch on (empty when it succeeded): ``no_power_method`` (no
    #: method can do it), ``power_failed`` (every method failed), ``wake_path_unverified`` (a standby
    #: refused because nobody could wake the host), ``standby_skipped`` (the host is no longer fit for
    #: standby: it holds VMs, is in maintenance...), ``move_deferred``, ``move_skipped`` (refused or
    #: put off), ``move_failed``, ``move_timeout`` (still migrating).
    code: str = ""


class PlanOutcome(msgspec.Struct, frozen=True, kw_only=True):
    plan: Plan
    results: list[StepResult]
    finished_at: float


class HostPower(msgspec.Struct, frozen=True, kw_only=True):
    """A host's power as the manager sees it."""

    host_id: str
    #: ``on``; ``standby`` (switched off by the manager); ``powering-on`` (waiting for its agent).
    state: Literal["on", "standby", "powering-on"]
    #: The host's power methods in order (``ipmi+wol``, ``sim``...), or None when it has none.
    method: str | None
    standby_since: float | None
    #: Energy counted since ``energy_since`` (kept across controller restarts, which are not counted),
    #: and where its latest sample came from.
    energy_kwh: float
    energy_source: str | None
    energy_since: float | None = None


class WakeCheckView(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    method: str
    detail: str


class HostPowerReport(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to an operator's power request."""

    host_id: str
    action: str
    #: The power state the host's methods read now (``on``, ``off``, ``unknown``).
    status: str
    power: HostPower
    detail: str
    wake_check: WakeCheckView | None = None


class PowerStatus(msgspec.Struct, frozen=True, kw_only=True):
    mode: str
    interval_s: float
    spare_hosts: int
    headroom: float
    idle_rounds: int
    cooldown_s: float
    max_migrations_per_round: int
    round: int
    hosts: list[HostPower]
    #: What became of the latest executed plan (at auto, or after ``POST /plan/apply``).
    last_outcome: PlanOutcome | None = None


class ModeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Switch the automation level."""

    mode: AutomationLevel


class HostPowerRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Power a host on, or put it in standby (``off``: it must be empty and its wake path verified)."""

    action: Literal["on", "off"]


# -- tokens and the audit log ---------------------------------------------------------------------------

Role = Literal["viewer", "operator", "admin"]


class TokenInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: Role
    created_at: float


class NewToken(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: Role
    #: Shown once; only its hash is kept.
    token: str


class TokenRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str = msgspec.field(name="name")
    role: Role = "viewer"


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    ts: float
    actor: str
    role: str
    method: str
    path: str
    status: int
    detail: str
