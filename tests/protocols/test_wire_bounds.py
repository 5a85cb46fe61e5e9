"""Every field on the wire is bounded: a host's forged numbers, lists and texts fail decoding in the
receiver's InboundDecoder, which drops the message, counts it and logs the field's path; the values
of real hardware, up to the documented ceilings, still decode.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import msgspec
import pytest

from protocols import codec, messages, topics
from protocols.migration import MigrationResult, MigrationSample
from protocols.vmspec import VmSpec
from tests.support.samples import BOOT_ID, capabilities

NOW = time.time()


def _inventory(**fields: Any) -> messages.HostInventory:
    base = messages.HostInventory(
        host_id="h1", boot_id=BOOT_ID, seq=1, ts=NOW, agent_version="1.0", address="10.0.0.1",
        capabilities=capabilities(), vms=[],
    )  # fmt: skip
    return msgspec.structs.replace(base, **fields)


def _caps(**fields: Any) -> messages.HostInventory:
    return _inventory(capabilities=msgspec.structs.replace(capabilities(), **fields))


def _status(name: str) -> messages.VmStatus:
    return messages.VmStatus(name=name, state="running", spec=VmSpec(name=name))


def _telemetry(**fields: Any) -> messages.HostTelemetry:
    base = messages.HostTelemetry(
        host_id="h1", seq=1, ts=NOW, cpu_util=0.5, memory_used_mib=1024, power_w=150.0
    )
    return msgspec.structs.replace(base, **fields)


def _vm_sample(**fields: Any) -> messages.HostTelemetry:
    vm = messages.VmTelemetry(name="web-1", cpu_util=0.5, dirty_mib_s=4.0, memory_mib=512)
    return _telemetry(vms=[msgspec.structs.replace(vm, **fields)])


def _event(**fields: Any) -> messages.VmEvent:
    base = messages.VmEvent(host_id="h1", seq=1, ts=NOW, vm="web-1", event="crashed", state="crashed")
    return msgspec.structs.replace(base, **fields)


def _reply(**fields: Any) -> messages.Reply:
    return msgspec.structs.replace(messages.Reply(op_id="op-1", host_id="h1", ok=False, ts=NOW), **fields)


def _progress(**fields: Any) -> messages.MigrationProgress:
    base = messages.MigrationProgress(
        host_id="h1", seq=1, ts=NOW, vm="web-1", op_id="op-1", stage="precopy",
        sample=MigrationSample(status="active"), downtime_limit_ms=300,
    )  # fmt: skip
    return msgspec.structs.replace(base, **fields)


def _state(**fields: Any) -> messages.HostState:
    return msgspec.structs.replace(
        messages.HostState(host_id="h1", online=True, boot_id=BOOT_ID, ts=NOW), **fields
    )


def _shutdown(**fields: Any) -> messages.ShutdownVm:
    return msgspec.structs.replace(messages.ShutdownVm(op_id="op-1", deadline=NOW + 30, vm="web-1"), **fields)


# (family, forged message, the field path the decoder's log names)
FORGED = [
    ("inventory", _caps(cores=10**9), "$.capabilities.cores"),
    ("inventory", _caps(cores=-4), "$.capabilities.cores"),
    ("inventory", _caps(memory_mib=10**12), "$.capabilities.memory_mib"),
    ("inventory", _caps(disk_gib=-1), "$.capabilities.disk_gib"),
    ("inventory", _caps(power_max_w=1e308), "$.capabilities.power_max_w"),
    ("inventory", _caps(power_idle_w=-1e308), "$.capabilities.power_idle_w"),
    ("inventory", _caps(power_idle_w=math.nan), "$.capabilities.power_idle_w"),
    ("inventory", _caps(cpu_model="x" * 10_000), "$.capabilities.cpu_model"),
    ("inventory", _caps(cpu_features=["f"] * 5000), "$.capabilities.cpu_features"),
    ("inventory", _inventory(seq=2**63), "$.seq"),
    ("inventory", _inventory(seq=-1), "$.seq"),
    ("inventory", _inventory(ts=math.inf), "$.ts"),
    ("inventory", _inventory(address="a" * 100_000), "$.address"),
    ("inventory", _inventory(boot_id="b" * 1000), "$.boot_id"),
    ("inventory", _inventory(vms=[_status(f"vm-{i}") for i in range(messages.MAX_VMS + 1)]), "$.vms"),
    ("inventory", _inventory(labels={f"k{i}": "v" for i in range(65)}), "$.labels"),
    ("inventory", _inventory(labels={"zone": "v" * 300}), "$.labels[...]"),
    ("inventory", _inventory(labels={"bad key\n": "v"}), "$.labels"),
    ("inventory", _inventory(vms=[_status("web-1\n")]), "$.vms[0].name"),
    ("telemetry", _telemetry(cpu_util=1.5), "$.cpu_util"),
    ("telemetry", _telemetry(cpu_util=math.nan), "$.cpu_util"),
    ("telemetry", _telemetry(power_w=-1e308), "$.power_w"),
    ("telemetry", _telemetry(memory_used_mib=-1), "$.memory_used_mib"),
    ("telemetry", _vm_sample(dirty_mib_s=1e12), "$.vms[0][2]"),  # array_like: by position
    ("telemetry", _vm_sample(cpu_util=-0.1), "$.vms[0][1]"),
    ("telemetry", _telemetry(vms=[_vm_sample().vms[0]] * (messages.MAX_VMS + 1)), "$.vms"),
    ("state", _state(reason="r" * 5000), "$.reason"),
    ("events", _event(reason="r" * 1_000_000), "$.reason"),
    ("events", _event(op_id="o" * 1000), "$.op_id"),
    ("events", _event(seq=-5), "$.seq"),
    ("events", _progress(note="n" * 5000), "$.note"),
    ("events", _progress(downtime_limit_ms=-1), "$.downtime_limit_ms"),
    (
        "events",
        _progress(sample=MigrationSample(status="active", transferred_bytes=-1)),
        "$.sample.transferred_bytes",
    ),
    (
        "events",
        _progress(sample=MigrationSample(status="active", bandwidth_bytes_s=math.nan)),
        "$.sample.bandwidth_bytes_s",
    ),
    ("events", _progress(sample=MigrationSample(status="active", throttle_pct=250)), "$.sample.throttle_pct"),
    ("events", _progress(sample=MigrationSample(status="failed", error="e" * 10_000)), "$.sample.error"),
    (
        "reply",
        _reply(migration=MigrationResult(status="completed", stage="precopy", total_ms=-1.0)),
        "$.migration.total_ms",
    ),
    (
        "reply",
        _reply(migration=MigrationResult(status="failed", stage="aborting", reason="r" * 10_000)),
        "$.migration.reason",
    ),
    ("reply", _reply(error="e" * 100_000), "$.error"),
    ("reply", _reply(uri="tcp:" + "9" * 1000), "$.uri"),
    ("cmd", _shutdown(timeout_s=1e9), "$.timeout_s"),
    ("cmd", _shutdown(timeout_s=0.0), "$.timeout_s"),
    ("cmd", _shutdown(deadline=-1.0), "$.deadline"),
]


@pytest.mark.parametrize(("family", "forged", "path"), FORGED, ids=[p for _, _, p in FORGED])
def test_a_value_beyond_its_bound_is_dropped_counted_and_named(
    family: topics.Family, forged: msgspec.Struct, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged value fails decoding; the decoder counts it and its log line names the field."""
    decoder = codec.InboundDecoder(max_bytes=16 * codec.MAX_PAYLOAD_BYTES)  # the schema's bound, not the cap
    with caplog.at_level(logging.WARNING, logger="protocols.codec"):
        assert decoder.decode(topics.host_topic("h1", family), codec.encode(forged)) is None
    assert decoder.stats.by_reason["wrong_type"] == 1 and decoder.stats.by_host["h1"] == 1
    [line] = [r.getMessage() for r in caplog.records]
    assert f"`{path}`" in line and topics.host_topic("h1", family) in line, line


def test_the_largest_real_hosts_still_decode() -> None:
    """At the documented ceilings (4,096 cores, 64 TiB, 100 kW, 4,096 VMs) an inventory is accepted."""
    big = _caps(
        cores=messages.MAX_CORES, memory_mib=messages.MAX_HOST_MEMORY_MIB, disk_gib=messages.MAX_DISK_GIB,
        power_idle_w=0.0, power_max_w=messages.MAX_POWER_W,
    )  # fmt: skip
    full = msgspec.structs.replace(
        big,
        seq=messages.MAX_SEQ,
        vms=[_status(f"vm-{i}") for i in range(messages.MAX_VMS)],
        labels={f"k{i}": "v" * 256 for i in range(messages.MAX_LABELS)},
    )
    # 4,096 VMs with their specs exceed the 1 MiB payload cap, which then is the tighter bound.
    schema_only = codec.InboundDecoder(max_bytes=16 * codec.MAX_PAYLOAD_BYTES)
    assert schema_only.decode(topics.host_topic("h1", "inventory"), codec.encode(full)) == full
    within_cap = msgspec.structs.replace(full, vms=full.vms[:1000])
    assert (
        codec.InboundDecoder().decode(topics.host_topic("h1", "inventory"), codec.encode(within_cap))
        == within_cap
    )
    sample = _telemetry(
        cpu_util=1.0, power_w=messages.MAX_POWER_W, memory_used_mib=messages.MAX_HOST_MEMORY_MIB
    )
    assert codec.InboundDecoder().decode(topics.host_topic("h1", "telemetry"), codec.encode(sample)) == sample
    stop = _shutdown(timeout_s=messages.MAX_STOP_TIMEOUT_S)
    assert codec.InboundDecoder().decode(topics.host_topic("h1", "cmd"), codec.encode(stop)) == stop


def _unbounded(info: msgspec.inspect.Type) -> bool:
    """Whether a scalar or container type lacks the bound its kind needs."""
    if isinstance(info, msgspec.inspect.StrType):
        return info.max_length is None and info.pattern is None
    if isinstance(info, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
        low = info.ge if info.ge is not None else info.gt
        high = info.le if info.le is not None else info.lt
        return low is None or high is None
    if isinstance(info, (msgspec.inspect.ListType, msgspec.inspect.DictType)):
        return info.max_length is None
    return False


def _children(info: msgspec.inspect.Type) -> list[msgspec.inspect.Type]:
    if isinstance(info, msgspec.inspect.ListType):
        return [info.item_type]
    if isinstance(info, msgspec.inspect.DictType):
        return [info.key_type, info.value_type]
    if isinstance(info, msgspec.inspect.UnionType):
        return list(info.types)
    return []


def test_every_field_of_every_bus_message_is_bounded() -> None:
    """Every number, text, list and dict declared in protocols.messages has its bounds (none forgotten)."""
    missing = []
    for struct in msgspec.inspect.multi_type_info(messages.ALL_MESSAGES):
        assert isinstance(struct, msgspec.inspect.StructType)
        for cls_info in [struct, *_nested_message_structs(struct)]:
            for field in cls_info.fields:
                pending = [field.type]
                while pending:
                    info = pending.pop()
                    if _unbounded(info):
                        missing.append(f"{cls_info.cls.__name__}.{field.name}: {info}")
                    pending += _children(info)
    assert not missing, "fields without bounds:\n" + "\n".join(missing)


def _nested_message_structs(struct: msgspec.inspect.StructType) -> list[msgspec.inspect.StructType]:
    """The structs declared in protocols.messages that ``struct`` contains (VmStatus, VmTelemetry...)."""
    found = []
    pending: list[msgspec.inspect.Type] = [f.type for f in struct.fields]
    while pending:
        info = pending.pop()
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls.__module__ == messages.__name__:
                found.append(info)
                pending += [f.type for f in info.fields]
        else:
            pending += _children(info)
    return found
