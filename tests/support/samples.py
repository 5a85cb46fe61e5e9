"""One realistic instance of every bus message, for conformance tests and anyone else who needs one.

``sample(cls)`` returns a fully populated message (optional fields set to non-default values where
that makes the sample more telling), and ``family_of(cls)`` the topic family that carries it. A new
message class in :data:`protocols.messages.ALL_MESSAGES` needs an entry here; the conformance test
says so when one is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from protocols import messages, topics
from protocols.migration import MigrationPolicy, MigrationResult, MigrationSample
from protocols.vmspec import VmSpec, VmWorkload

T = TypeVar("T", bound=msgspec.Struct)

HOST_ID = "node-07.rack2"
BOOT_ID = "5f0c2b7e-3d1a-4c55-9d1e-0b8f2a6c9e41"
TS = 1_718_000_000.25
DEADLINE = TS + 30.0


def vm_spec(name: str = "web-1") -> VmSpec:
    return VmSpec(
        name=name,
        vcpus=2,
        memory_mib=2048,
        disk_gib=20,
        arch="x86_64",
        labels={"app": "web", "tier": "frontend"},
        workload=VmWorkload(cpu_util=0.35, dirty_mib_s=12.5, boot_s=1.5),
    )


def capabilities() -> messages.Capabilities:
    return messages.Capabilities(
        engine="qemu",
        engine_version="7.2.0",
        arch="x86_64",
        cpu_vendor="GenuineIntel",
        cpu_model="Intel Xeon Processor (Icelake)",
        cpu_features=["vmx", "ept", "avx2", "aes"],
        accel="tcg",
        cores=16,
        memory_mib=65536,
        disk_gib=900,
        guest_arches=["x86_64", "i386"],
        machine_types=["pc", "q35", "microvm"],
        power_idle_w=95.0,
        power_max_w=310.5,
    )


def vm_status(name: str = "web-1") -> messages.VmStatus:
    return messages.VmStatus(
        name=name, state="running", spec=vm_spec(name), started_at=TS - 3600.0, reason="started by op-41"
    )


def _host_state() -> messages.HostState:
    return messages.HostState(host_id=HOST_ID, online=True, boot_id=BOOT_ID, ts=TS, reason="agent started")


def _inventory() -> messages.HostInventory:
    return messages.HostInventory(
        host_id=HOST_ID,
        boot_id=BOOT_ID,
        seq=42,
        ts=TS,
        agent_version="0.1.0",
        address="10.0.2.7",
        capabilities=capabilities(),
        vms=[
            vm_status("web-1"),
            messages.VmStatus(name="db-1", state="stopped", spec=vm_spec("db-1"), reason="guest shutdown"),
        ],
        reason="reconnect",
    )


def _telemetry() -> messages.HostTelemetry:
    return messages.HostTelemetry(
        host_id=HOST_ID,
        seq=9001,
        ts=TS,
        cpu_util=0.41,
        memory_used_mib=12288,
        power_w=180.25,
        vms=[
            messages.VmTelemetry(name="web-1", cpu_util=0.35, dirty_mib_s=12.5, memory_mib=2048),
            messages.VmTelemetry(name="db-1", cpu_util=0.0, dirty_mib_s=0.0, memory_mib=4096),
        ],
    )


def _reply() -> messages.Reply:
    return messages.Reply(
        op_id="op-41",
        host_id=HOST_ID,
        ok=False,
        ts=TS,
        code="invalid_state",
        error="vm 'web-1' is paused; resume it first",
        vm=vm_status("web-1"),
    )


def _vm_event() -> messages.VmEvent:
    return messages.VmEvent(
        host_id=HOST_ID,
        seq=7,
        ts=TS,
        vm="web-1",
        event="crashed",
        state="crashed",
        reason="qemu exited with status 1",
        op_id="op-41",
    )


def _progress() -> messages.MigrationProgress:
    return messages.MigrationProgress(
        host_id=HOST_ID,
        seq=12,
        ts=TS,
        vm="web-1",
        op_id=OP_ID,
        stage="downtime_raised",
        sample=MigrationSample(
            status="active",
            total_bytes=2 << 30,
            transferred_bytes=3 << 30,
            remaining_bytes=96 << 20,
            dirty_rate_bytes_s=180e6,
            bandwidth_bytes_s=950e6,
            iteration=6,
            expected_downtime_ms=410.0,
            throttle_pct=30,
        ),
        downtime_limit_ms=600,
        note="not converging: allowed downtime raised to 600 ms",
    )


def _migrated_reply() -> messages.Reply:
    return messages.Reply(
        op_id=OP_ID,
        host_id=HOST_ID,
        ok=True,
        ts=TS,
        uri="tcp:10.0.2.7:49152",
        migration=MigrationResult(
            status="completed",
            stage="throttling",
            total_ms=4210.5,
            downtime_ms=212.0,
            transferred_bytes=5 << 30,
            iterations=9,
            reason="converged with the vCPUs throttled to 40%",
        ),
    )


OP_ID = "op-41"

_BUILDERS: dict[type[msgspec.Struct], Callable[[], msgspec.Struct]] = {
    messages.HostState: _host_state,
    messages.HostInventory: _inventory,
    messages.HostTelemetry: _telemetry,
    messages.DefineVm: lambda: messages.DefineVm(
        op_id=OP_ID, deadline=DEADLINE, spec=vm_spec("web-2"), start=False
    ),
    messages.StartVm: lambda: messages.StartVm(op_id=OP_ID, deadline=DEADLINE, vm="web-1"),
    messages.ShutdownVm: lambda: messages.ShutdownVm(
        op_id=OP_ID, deadline=DEADLINE, vm="web-1", timeout_s=12.5
    ),
    messages.DestroyVm: lambda: messages.DestroyVm(op_id=OP_ID, deadline=DEADLINE, vm="web-1"),
    messages.PauseVm: lambda: messages.PauseVm(op_id=OP_ID, deadline=DEADLINE, vm="web-1"),
    messages.ResumeVm: lambda: messages.ResumeVm(op_id=OP_ID, deadline=DEADLINE, vm="web-1"),
    messages.RebootVm: lambda: messages.RebootVm(op_id=OP_ID, deadline=DEADLINE, vm="web-1"),
    messages.UndefineVm: lambda: messages.UndefineVm(op_id=OP_ID, deadline=DEADLINE, vm="web-1"),
    messages.RefreshInventory: lambda: messages.RefreshInventory(op_id=OP_ID, deadline=DEADLINE),
    messages.PrepareMigration: lambda: messages.PrepareMigration(
        op_id=OP_ID, deadline=DEADLINE, spec=vm_spec("web-1"), source_host="node-03.rack1"
    ),
    messages.MigrateVm: lambda: messages.MigrateVm(
        op_id=OP_ID,
        deadline=DEADLINE,
        vm="web-1",
        uri="tcp:10.0.2.7:49152",
        dest_host="node-07.rack2",
        policy=MigrationPolicy(max_downtime_ms=150, bandwidth_mib_s=512.0, postcopy=True, xbzrle=True),
    ),
    messages.CancelMigration: lambda: messages.CancelMigration(op_id=OP_ID, deadline=DEADLINE, vm="web-1"),
    messages.FinishMigration: lambda: messages.FinishMigration(op_id=OP_ID, deadline=DEADLINE, vm="web-1"),
    messages.AbortMigration: lambda: messages.AbortMigration(op_id=OP_ID, deadline=DEADLINE, vm="web-1"),
    messages.AgentRefused: lambda: messages.AgentRefused(
        host_id=HOST_ID, boot_id=BOOT_ID, kept_boot_id="0" * 32, ts=TS, reason="two runs took turns"
    ),
    messages.Reply: _reply,
    messages.MigrationProgress: _progress,
    messages.VmEvent: _vm_event,
    messages.Capabilities: capabilities,
    messages.VmStatus: vm_status,
    VmSpec: vm_spec,
}

_FAMILIES: dict[type[msgspec.Struct], topics.Family] = {
    messages.HostState: "state",
    messages.HostInventory: "inventory",
    messages.HostTelemetry: "telemetry",
    messages.Reply: "reply",
    messages.VmEvent: "events",
    messages.MigrationProgress: "events",
    messages.AgentRefused: "cmd",
}


class NoSampleError(LookupError):
    """A message class has no sample yet."""


def sample(cls: type[T]) -> T:
    """A realistic, fully populated instance of ``cls``.

    Raises:
        NoSampleError: ``cls`` has no sample; add a builder to tests/support/samples.py.
    """
    builder = _BUILDERS.get(cls)
    if builder is None:
        raise NoSampleError(
            f"no sample for {cls.__qualname__}; add a builder for it to _BUILDERS in tests/support/samples.py"
        )
    value = builder()
    assert isinstance(value, cls)
    return value


def is_command(cls: type[msgspec.Struct]) -> bool:
    return issubclass(cls, messages._Command)


def family_of(cls: type[msgspec.Struct]) -> topics.Family:
    """The topic family that carries ``cls``.

    Raises:
        NoSampleError: ``cls`` is not a known bus message.
    """
    if is_command(cls):
        return "cmd"
    try:
        return _FAMILIES[cls]
    except KeyError:
        raise NoSampleError(
            f"{cls.__qualname__} is in no topic family; add it to _FAMILIES in tests/support/samples.py"
        ) from None


def topic_for(message: msgspec.Struct, host_id: str = HOST_ID) -> str:
    """The topic ``message`` travels on: its sender's subtree, or ``host_id``'s for commands."""
    sender = getattr(message, "host_id", host_id)
    return topics.host_topic(sender, family_of(type(message)))


def tag_of(cls: type[msgspec.Struct]) -> Any:
    """The ``kind`` value ``cls`` carries on the wire."""
    return cls.__struct_config__.tag
