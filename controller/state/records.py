"""The store's rows as frozen msgspec Structs (the same types the API serves), and their codecs.

It may import ``protocols``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from protocols.messages import Capabilities
from protocols.vmspec import VmSpec

VmState = Literal[
    "creating",
    "starting",
    "running",
    "paused",
    "stopping",
    "stopped",
    "crashed",
    "deleting",
    "migrating",
    "error",
    "missing",
]
OpState = Literal["running", "succeeded", "failed"]
OpKind = Literal[
    "create",
    "start",
    "stop",
    "delete",
    "restart",
    "pause",
    "resume",
    "reboot",
    "migrate",
    "evacuate",
    "move",
    "bulk",
    "rolling",
]


class HostRecord(msgspec.Struct, frozen=True, kw_only=True):
    host_id: str
    online: bool
    boot_id: str
    address: str
    agent_version: str
    capabilities: Capabilities
    maintenance: bool
    state_reason: str
    first_seen: float
    last_seen: float
    #: Labels the host's agent reports (``agent --label``), and those an operator set; the operator's win.
    agent_labels: dict[str, str] = {}
    operator_labels: dict[str, str] = {}
    #: When the power manager put the host in standby (switched off, not placeable); None while it is on.
    standby_since: float | None = None
    #: When the host was fenced (its VMs confirmed stopped: by HA's fencing, or by an operator's
    #: ``host confirm-down``), and how; None once it is back.
    fenced_at: float | None = None
    fenced_how: str = ""

    @property
    def labels(self) -> dict[str, str]:
        return {**self.agent_labels, **self.operator_labels}


class VmRecord(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    uuid: str
    spec: VmSpec
    host_id: str | None
    state: VmState
    op_id: str | None
    error: str
    created_at: float
    updated_at: float
    #: While a live migration runs: the destination, which holds a claim for the VM as well.
    migrating_to: str | None = None
    #: The placement rules given at create (``SchedulingHints`` as a mapping), kept for the VM's life:
    #: every later move honours them.
    hints: dict[str, Any] = {}


class OperationRecord(msgspec.Struct, frozen=True, kw_only=True):
    op_id: str
    kind: OpKind
    vm: str
    host_id: str | None
    state: OpState
    error: str
    params: dict[str, Any]
    deadline: float
    created_at: float
    updated_at: float
    #: The bulk action this operation was started by ("" for none).
    parent: str = ""


class HostEnergyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A host's energy counters: joules by source (``measured``, ``model``, ``standby``)."""

    host_id: str
    joules: dict[str, float]
    #: When counting began for this host (its first saved sample).
    since: float


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Resources claimed on one host by the VMs assigned to it."""

    vcpus: int = 0
    memory_mib: int = 0
    disk_gib: int = 0
    vms: int = 0


caps_decoder = msgspec.msgpack.Decoder(Capabilities)
spec_decoder = msgspec.msgpack.Decoder(VmSpec)
params_decoder = msgspec.msgpack.Decoder(dict[str, Any])
labels_decoder = msgspec.msgpack.Decoder(dict[str, str])
energy_decoder = msgspec.msgpack.Decoder(dict[str, float])
encoder = msgspec.msgpack.Encoder()


def host_of(row: tuple[Any, ...]) -> HostRecord:
    return HostRecord(
        host_id=row[0],
        online=bool(row[1]),
        boot_id=row[2],
        address=row[3],
        agent_version=row[4],
        capabilities=caps_decoder.decode(row[5]),
        maintenance=bool(row[6]),
        state_reason=row[7],
        first_seen=row[8],
        last_seen=row[9],
        agent_labels=labels_decoder.decode(row[10]),
        operator_labels=labels_decoder.decode(row[11]),
        standby_since=row[12],
        fenced_at=row[13],
        fenced_how=row[14],
    )


def vm_of(row: tuple[Any, ...]) -> VmRecord:
    return VmRecord(
        name=row[0],
        uuid=row[1],
        spec=spec_decoder.decode(row[2]),
        host_id=row[3],
        state=row[4],
        op_id=row[8],
        error=row[9],
        created_at=row[10],
        updated_at=row[11],
        migrating_to=row[12],
        hints=params_decoder.decode(row[13]),
    )


def op_of(row: tuple[Any, ...]) -> OperationRecord:
    return OperationRecord(
        op_id=row[0],
        kind=row[1],
        vm=row[2],
        host_id=row[3],
        state=row[4],
        error=row[5],
        params=params_decoder.decode(row[6]),
        deadline=row[7],
        created_at=row[8],
        updated_at=row[9],
        parent=row[10],
    )
