"""Every message that crosses the bus, as frozen msgspec Structs in tagged unions.

The envelope is the Struct itself: ``kind`` is the tag, and commands carry their operation id and
deadline in the payload rather than in MQTT 5 properties, so the protocol works the same over MQTT
3.1.1 (the embedded broker) and MQTT 5 (Mosquitto, clusters).

Evolution rules (checked by the fingerprint test in ``tests/protocols``):
- a new field gets a default and goes last;
- a field is never retyped, renamed or reordered;
- a breaking change moves to a new topic version (``fv/v2``).
Receivers ignore unknown fields, so older peers keep working when a field is added.

Every field a peer sends is bounded (see "Bounds on the wire" below): a value outside its bound
fails decoding, and the receiver drops the whole message, counted and logged with the field's path.
Adding or widening a bound on an existing field is compatible while every value a correct peer
sends stays inside it; narrowing one below what a correct peer can send is a breaking change.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from protocols.migration import MigrationPolicy, MigrationResult, MigrationSample, MigrationStage
from protocols.vmspec import HostId, Label, VmName, VmSpec

WIRE_VERSION = 1

# --------------------------------------------------------------------------------------------
# Bounds on the wire
# --------------------------------------------------------------------------------------------
# A host with valid credentials can still send any number it likes, so every field is bounded to
# what real hardware can have, with room to spare, and the decoder refuses the rest:
#
#   cores                  1 .. 4,096             (the largest single-image servers have ~1,000)
#   memory                 1 MiB .. 64 TiB         (host); a VM's is bounded by VmSpec (16 TiB)
#   disk                   0 .. 16 PiB
#   power                  0 .. 100 kW, finite     (a loaded 8-socket server draws ~5 kW)
#   utilisation            0 .. 1
#   dirty rate             0 .. 100,000 MiB/s      (as VmWorkload; beyond any memory bus)
#   seq                    0 .. 2**63 - 1          (SQLite's INTEGER)
#   timestamps, deadlines  0 .. 2**36 s            (Unix time; year ~4100), finite
#   stop timeout           > 0 .. 3,600 s
#   VMs per message        4,096
#   labels                 64 per host, keys as VmSpec labels, values 256 characters
#   host ids, VM names     the patterns of protocols.vmspec (no control characters, 64 at most)
#   other ids, versions    128 characters (op ids 256, they grow a suffix per step)
#   addresses              256 characters (a DNS name is at most 253); migration URIs 512
#   reasons, notes         1,024 characters; errors 4,096 (an engine's message can be long)
#   lists of names         1,024 CPU features, 256 machine types, 32 guest arches; 64 chars each
#
# Text within its length can still hold control characters: print or log it through
# protocols.text.printable.

MAX_CORES = 4096
MAX_HOST_MEMORY_MIB = 64 * 1024 * 1024
MAX_DISK_GIB = 16 * 1024 * 1024
MAX_POWER_W = 100_000.0
MAX_DIRTY_MIB_S = 100_000.0
MAX_SEQ = 2**63 - 1
MAX_TS = float(2**36)
MAX_STOP_TIMEOUT_S = 3600.0
MAX_VMS = 4096
MAX_LABELS = 64

Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
Timestamp = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TS)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Watts = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_POWER_W)]
HostMemoryMib = Annotated[int, msgspec.Meta(ge=0, le=MAX_HOST_MEMORY_MIB)]
DirtyRate = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_DIRTY_MIB_S)]
Ident = Annotated[str, msgspec.Meta(max_length=128)]
OpId = Annotated[str, msgspec.Meta(max_length=256)]
Name = Annotated[str, msgspec.Meta(max_length=64)]
Address = Annotated[str, msgspec.Meta(max_length=256)]
Uri = Annotated[str, msgspec.Meta(max_length=512)]
Reason = Annotated[str, msgspec.Meta(max_length=1024)]
ErrorText = Annotated[str, msgspec.Meta(max_length=4096)]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]
StopTimeout = Annotated[float, msgspec.Meta(gt=0.0, le=MAX_STOP_TIMEOUT_S)]


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every bus message: tagged by ``kind`` so a receiver can tell them apart."""


# --------------------------------------------------------------------------------------------
# Host identity, capabilities and inventory
# --------------------------------------------------------------------------------------------

Accel = Literal["sim", "kvm", "tcg"]


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a host can run. The scheduler's filters read these."""

    engine: Ident
    engine_version: Ident = ""
    arch: Ident
    cpu_vendor: Ident = ""
    cpu_model: Annotated[str, msgspec.Meta(max_length=256)] = ""
    cpu_features: Annotated[list[Name], msgspec.Meta(max_length=1024)] = []
    accel: Accel
    cores: Annotated[int, msgspec.Meta(ge=1, le=MAX_CORES)]
    memory_mib: Annotated[int, msgspec.Meta(ge=1, le=MAX_HOST_MEMORY_MIB)]
    disk_gib: Annotated[int, msgspec.Meta(ge=0, le=MAX_DISK_GIB)] = 0
    guest_arches: Annotated[list[Name], msgspec.Meta(max_length=32)] = []
    machine_types: Annotated[list[Name], msgspec.Meta(max_length=256)] = []
    #: Power model: watts drawn at idle and at full load (SPECpower style endpoints).
    power_idle_w: Watts = 0.0
    power_max_w: Watts = 0.0


#: ``incoming``: a destination copy waiting for a live migration's stream (never runs on its own).
VmPowerState = Literal[
    "defined", "starting", "running", "paused", "stopping", "stopped", "crashed", "incoming"
]


class VmStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One VM as its host sees it right now."""

    name: VmName
    state: VmPowerState
    spec: VmSpec
    started_at: Timestamp | None = None
    reason: Reason = ""


class HostState(_Message, tag="host_state", frozen=True, kw_only=True):
    """Retained liveness record; the agent's Last Will publishes the ``online=False`` variant."""

    host_id: HostId
    online: bool
    boot_id: Ident
    ts: Timestamp
    reason: Reason = ""


class HostInventory(_Message, tag="inventory", frozen=True, kw_only=True):
    """The hello: who the host is, what it can do, and every VM it has.

    Retained, and published again on every (re)connect and after every VM change, so a controller
    that restarts learns the whole fleet from the broker at once.
    """

    host_id: HostId
    boot_id: Ident
    seq: Seq
    ts: Timestamp
    agent_version: Ident
    #: Address other hosts use to reach this one (migration data path).
    address: Address
    capabilities: Capabilities
    vms: Annotated[list[VmStatus], msgspec.Meta(max_length=MAX_VMS)]
    reason: Literal["hello", "reconnect", "change", "refresh"] = "hello"
    #: Labels the host asserts about itself (``agent --label``); operator-set labels override them.
    labels: Annotated[dict[Label, LabelValue], msgspec.Meta(max_length=MAX_LABELS)] = {}
    #: A one-time join token (``agent --join-token``) that enrols a new host id without an operator's
    #: ``host accept``; empty for an enrolled host.
    join_token: Ident = ""


# --------------------------------------------------------------------------------------------
# Telemetry (QoS 0, frequent)
# --------------------------------------------------------------------------------------------


class VmTelemetry(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Per-VM sample. ``array_like`` keeps the frequent message small; order is part of the contract."""

    name: VmName
    cpu_util: Fraction
    dirty_mib_s: DirtyRate
    memory_mib: HostMemoryMib


class HostTelemetry(_Message, tag="telemetry", frozen=True, kw_only=True):
    """One sample of the host and all of its running VMs."""

    host_id: HostId
    seq: Seq
    ts: Timestamp
    cpu_util: Fraction
    memory_used_mib: HostMemoryMib
    power_w: Watts
    vms: Annotated[list[VmTelemetry], msgspec.Meta(max_length=MAX_VMS)] = []


# --------------------------------------------------------------------------------------------
# Commands (controller -> agent, QoS 1) and replies (agent -> controller, QoS 1)
# --------------------------------------------------------------------------------------------


class _Command(_Message, frozen=True, kw_only=True):
    """Every command carries the id the agent deduplicates on, and a deadline after which it is void."""

    op_id: OpId
    deadline: Timestamp


class DefineVm(_Command, tag="define_vm", frozen=True, kw_only=True):
    """Define a VM on this host, and start it when ``start`` is set."""

    spec: VmSpec
    start: bool = True


class StartVm(_Command, tag="start_vm", frozen=True, kw_only=True):
    vm: VmName


class ShutdownVm(_Command, tag="shutdown_vm", frozen=True, kw_only=True):
    """Ask the guest to power off; destroy it if it has not after ``timeout_s``."""

    vm: VmName
    timeout_s: StopTimeout = 30.0


class DestroyVm(_Command, tag="destroy_vm", frozen=True, kw_only=True):
    """Power the VM off at once (the guest gets no say)."""

    vm: VmName


class PauseVm(_Command, tag="pause_vm", frozen=True, kw_only=True):
    vm: VmName


class ResumeVm(_Command, tag="resume_vm", frozen=True, kw_only=True):
    vm: VmName


class RebootVm(_Command, tag="reboot_vm", frozen=True, kw_only=True):
    vm: VmName


class UndefineVm(_Command, tag="undefine_vm", frozen=True, kw_only=True):
    """Destroy the VM if it runs, then forget it and its runtime files."""

    vm: VmName


class RefreshInventory(_Command, tag="refresh_inventory", frozen=True, kw_only=True):
    """Ask the agent to publish its full inventory now."""


# Live migration: the controller drives a state machine with these; see docs/migration.md.


class PrepareMigration(_Command, tag="prepare_migration", frozen=True, kw_only=True):
    """Destination: define the VM and start a copy that listens for the stream; the reply has the URI."""

    spec: VmSpec
    source_host: HostId
    #: The destination needs part of it (capabilities both sides must enable, e.g. multifd).
    policy: MigrationPolicy = MigrationPolicy()


class MigrateVm(_Command, tag="migrate_vm", frozen=True, kw_only=True):
    """Source: send the running VM to ``uri`` under ``policy``; the reply comes when the migration ends.

    Re-sending the same operation attaches to the migration already under way instead of starting
    another, so a restarted agent or controller picks up where it was.
    """

    vm: VmName
    uri: Uri
    dest_host: HostId
    policy: MigrationPolicy = MigrationPolicy()


class CancelMigration(_Command, tag="cancel_migration", frozen=True, kw_only=True):
    """Source: cancel the VM's pre-copy migration; the VM keeps running here. Refused in post-copy."""

    vm: VmName


class FinishMigration(_Command, tag="finish_migration", frozen=True, kw_only=True):
    """Destination: the stream is complete; make sure the copy runs and keep it as an ordinary VM."""

    vm: VmName


class AbortMigration(_Command, tag="abort_migration", frozen=True, kw_only=True):
    """Destination: discard the incoming copy and its files (a no-op when there is none). Refused
    with ``migration_completed`` when the copy holds the whole guest: it is then finished instead.
    """

    vm: VmName


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


class AgentRefused(_Message, tag="agent_refused", frozen=True, kw_only=True):
    """Controller -> agent: the agent run ``boot_id`` is refused, because another agent with the same
    host id is live and was there first. The run it names stops (without an offline state, which
    would speak for the other); any other run of the host ignores it.
    """

    host_id: HostId
    boot_id: Ident
    #: The run that keeps the host id.
    kept_boot_id: Ident
    ts: Timestamp
    reason: Reason = ""


#: What the ``cmd`` topic carries: the commands, and the refusal of a duplicate agent run.
CmdMessage = Command | AgentRefused

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
    "migration_completed",
]


class Reply(_Message, tag="reply", frozen=True, kw_only=True):
    """The outcome of one command. Replaying the same ``op_id`` yields the same reply."""

    op_id: OpId
    host_id: HostId
    ok: bool
    ts: Timestamp
    code: ErrorCode = ""
    error: ErrorText = ""
    vm: VmStatus | None = None
    #: PrepareMigration: where the source sends the stream (``tcp:HOST:PORT``).
    uri: Uri = ""
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

    host_id: HostId
    seq: Seq
    ts: Timestamp
    vm: VmName
    event: VmEventKind
    state: VmPowerState
    reason: Reason = ""
    op_id: OpId = ""


class MigrationProgress(_Message, tag="migration_progress", frozen=True, kw_only=True):
    """The source agent's running account of one migration, about twice a second."""

    host_id: HostId
    seq: Seq
    ts: Timestamp
    vm: VmName
    op_id: OpId
    stage: MigrationStage
    sample: MigrationSample
    #: The allowed downtime now (the guard may have raised it).
    downtime_limit_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)]
    #: Set when the guard acted on this sample.
    note: Reason = ""


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
    AgentRefused,
    Reply,
    VmEvent,
    MigrationProgress,
)
