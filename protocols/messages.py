"""Every message that crosses the bus, as frozen msgspec Structs in tagged unions.

The envelope is the Struct itself: ``kind`` is the tag, and commands carry their operation id and
deadline in the payload rather than in MQTT 5 properties, so the protocol works the same over MQTT
3.1.1 (the embedded broker) and MQTT 5 (Mosquitto, clusters).

Evolution rules (checked by the fingerprint test in ``tests/protocols``):
- a new field gets a default and goes last;
- a field is never retyped, renamed or reordered;
- a breaking change moves to a new topic version (``fv/v2``).
Receivers ignore unknown fields, so older peers keep working when a field is added.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from protocols.migration import MigrationPolicy, MigrationResult, MigrationSample, MigrationStage
from protocols.vmspec import VmSpec

WIRE_VERSION = 1


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every bus message: tagged by ``kind`` so a receiver can tell them apart."""


# --------------------------------------------------------------------------------------------
# Host identity, capabilities and inventory
# --------------------------------------------------------------------------------------------

Accel = Literal["sim", "kvm", "tcg"]


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a host can run. The scheduler's filters read these."""

    engine: str
    engine_version: str = ""
    arch: str
    cpu_vendor: str = ""
    cpu_model: str = ""
    cpu_features: list[str] = []
    accel: Accel
    cores: int
    memory_mib: int
    disk_gib: int = 0
    guest_arches: list[str] = []
    machine_types: list[str] = []
    #: Power model: watts drawn at idle and at full load (SPECpower style endpoints).
    power_idle_w: float = 0.0
    power_max_w: float = 0.0


#: ``incoming``: a destination copy waiting for a live migration's stream (never runs on its own).
VmPowerState = Literal[
    "defined", "starting", "running", "paused", "stopping", "stopped", "crashed", "incoming"
]


class VmStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One VM as its host sees it right now."""

    name: str
    state: VmPowerState
    spec: VmSpec
    started_at: float | None = None
    reason: str = ""


class HostState(_Message, tag="host_state", frozen=True, kw_only=True):
    """Retained liveness record; the agent's Last Will publishes the ``online=False`` variant."""

    host_id: str
    online: bool
    boot_id: str
    ts: float
    reason: str = ""


class HostInventory(_Message, tag="inventory", frozen=True, kw_only=True):
    """The hello: who the host is, what it can do, and every VM it has.

    Retained, and published again on every (re)connect and after every VM change, so a controller
    that restarts learns the whole fleet from the broker at once.
    """

    host_id: str
    boot_id: str
    seq: int
    ts: float
    agent_version: str
    #: Address other hosts use to reach this one (migration data path).
    address: str
    capabilities: Capabilities
    vms: list[VmStatus]
    reason: Literal["hello", "reconnect", "change", "refresh"] = "hello"
    #: Labels the host asserts about itself (``agent --label``); operator-set labels override them.
    labels: dict[str, str] = {}
    #: A one-time join token (``agent --join-token``) that enrols a new host id without an operator's
    #: ``host accept``; empty for an enrolled host.
    join_token: str = ""


# --------------------------------------------------------------------------------------------
# Telemetry (QoS 0, frequent)
# --------------------------------------------------------------------------------------------


class VmTelemetry(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Per-VM sample. ``array_like`` keeps the frequent message small; order is part of the contract."""

    name: str
    cpu_util: float
    dirty_mib_s: float
    memory_mib: int


class HostTelemetry(_Message, tag="telemetry", frozen=True, kw_only=True):
    """One sample of the host and all of its running VMs."""

    host_id: str
    seq: int
    ts: float
    cpu_util: float
    memory_used_mib: int
    power_w: float
    vms: list[VmTelemetry] = []


# --------------------------------------------------------------------------------------------
# Commands (controller -> agent, QoS 1) and replies (agent -> controller, QoS 1)
# --------------------------------------------------------------------------------------------


class _Command(_Message, frozen=True, kw_only=True):
    """Every command carries the id the agent deduplicates on, and a deadline after which it is void."""

    op_id: str
    deadline: float


class DefineVm(_Command, tag="define_vm", frozen=True, kw_only=True):
    """Define a VM on this host, and start it when ``start`` is set."""

    spec: VmSpec
    start: bool = True


class StartVm(_Command, tag="start_vm", frozen=True, kw_only=True):
    vm: str


class ShutdownVm(_Command, tag="shutdown_vm", frozen=True, kw_only=True):
    """Ask the guest to power off; destroy it if it has not after ``timeout_s``."""

    vm: str
    timeout_s: float = 30.0


class DestroyVm(_Command, tag="destroy_vm", frozen=True, kw_only=True):
    """Power the VM off at once (the guest gets no say)."""

    vm: str


class PauseVm(_Command, tag="pause_vm", frozen=True, kw_only=True):
    vm: str


class ResumeVm(_Command, tag="resume_vm", frozen=True, kw_only=True):
    vm: str


class RebootVm(_Command, tag="reboot_vm", frozen=True, kw_only=True):
    vm: str


class UndefineVm(_Command, tag="undefine_vm", frozen=True, kw_only=True):
    """Destroy the VM if it runs, then forget it and its runtime files."""

    vm: str


class RefreshInventory(_Command, tag="refresh_inventory", frozen=True, kw_only=True):
    """Ask the agent to publish its full inventory now."""


# Live migration: the controller drives a state machine with these; see docs/migration.md.


class PrepareMigration(_Command, tag="prepare_migration", frozen=True, kw_only=True):
    """Destination: define the VM and start a copy that listens for the stream; the reply has the URI."""

    spec: VmSpec
    source_host: str
    #: The destination needs part of it (capabilities both sides must enable, e.g. multifd).
    policy: MigrationPolicy = MigrationPolicy()


class MigrateVm(_Command, tag="migrate_vm", frozen=True, kw_only=True):
    """Source: send the running VM to ``uri`` under ``policy``; the reply comes when the migration ends.

    Re-sending the same operation attaches to the migration already under way instead of starting
    another, so a restarted agent or controller picks up where it was.
    """

    vm: str
    uri: str
    dest_host: str
    policy: MigrationPolicy = MigrationPolicy()


class CancelMigration(_Command, tag="cancel_migration", frozen=True, kw_only=True):
    """Source: cancel the VM's pre-copy migration; the VM keeps running here. Refused in post-copy."""

    vm: str


class FinishMigration(_Command, tag="finish_migration", frozen=True, kw_only=True):
    """Destination: the stream is complete; make sure the copy runs and keep it as an ordinary VM."""

    vm: str


class AbortMigration(_Command, tag="abort_migration", frozen=True, kw_only=True):
    """Destination: discard the incoming copy and its files (a no-op when there is none)."""

    vm: str


Command = (
    DefineVm
    | StartVm
    | ShutdownVm
    | DestroyVm
    | PauseVm
    | ResumeVm
    | RebootVm
    | UndefineVm
    | RefreshInventory
    | PrepareMigration
    | MigrateVm
    | CancelMigration
    | FinishMigration
    | AbortMigration
)

ErrorCode = Literal[
    "",
    "unknown_vm",
    "vm_exists",
    "invalid_state",
    "insufficient_resources",
    "expired",
    "invalid_request",
    "engine_error",
    "migration_failed",
]


class Reply(_Message, tag="reply", frozen=True, kw_only=True):
    """The outcome of one command. Replaying the same ``op_id`` yields the same reply."""

    op_id: str
    host_id: str
    ok: bool
    ts: float
    code: ErrorCode = ""
    error: str = ""
    vm: VmStatus | None = None
    #: PrepareMigration: where the source sends the stream (``tcp:HOST:PORT``).
    uri: str = ""
    #: MigrateVm: how the migration ended (also on failure).
    migration: MigrationResult | None = None


# --------------------------------------------------------------------------------------------
# Events (agent -> controller, QoS 1)
# --------------------------------------------------------------------------------------------

VmEventKind = Literal[
    "defined", "started", "paused", "resumed", "rebooted", "shutdown", "stopped", "crashed", "undefined"
]


class VmEvent(_Message, tag="vm_event", frozen=True, kw_only=True):
    """Something happened to a VM, whether or not a command asked for it (guest shutdown, crash)."""

    host_id: str
    seq: int
    ts: float
    vm: str
    event: VmEventKind
    state: VmPowerState
    reason: str = ""
    op_id: str = ""


class MigrationProgress(_Message, tag="migration_progress", frozen=True, kw_only=True):
    """The source agent's running account of one migration, about twice a second."""

    host_id: str
    seq: int
    ts: float
    vm: str
    op_id: str
    stage: MigrationStage
    sample: MigrationSample
    #: The allowed downtime now (the guard may have raised it).
    downtime_limit_ms: int
    #: Set when the guard acted on this sample.
    note: str = ""


Event = VmEvent | MigrationProgress

#: Every message kind, for the conformance tests and decoders.
ALL_MESSAGES: tuple[type[msgspec.Struct], ...] = (
    HostState,
    HostInventory,
    HostTelemetry,
    DefineVm,
    StartVm,
    ShutdownVm,
    DestroyVm,
    PauseVm,
    ResumeVm,
    RebootVm,
    UndefineVm,
    RefreshInventory,
    PrepareMigration,
    MigrateVm,
    CancelMigration,
    FinishMigration,
    AbortMigration,
    Reply,
    VmEvent,
    MigrationProgress,
)
