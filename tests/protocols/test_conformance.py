"""Conformance of every bus message: our codec, the reference ``msgpack`` codec, and evolution.

For each class in ALL_MESSAGES a realistic sample is encoded by ``protocols.codec`` and decoded back
through the InboundDecoder on its topic family; the same bytes are read by the independent
``msgpack`` package; and bytes written by ``msgpack`` from plain data are accepted by our decoder.
The evolution tests pin the rules in protocols/messages.py: unknown fields are ignored and missing
defaulted fields take their default.
"""

from __future__ import annotations

from typing import Any

import msgpack
import msgspec
import pytest

from protocols import codec, messages
from tests.support import samples

MESSAGE_CLASSES = messages.ALL_MESSAGES
ids = [cls.__name__ for cls in MESSAGE_CLASSES]


def _builtins(message: msgspec.Struct) -> dict[str, Any]:
    data = msgspec.to_builtins(message)
    assert isinstance(data, dict)
    return data


def _decode(raw: bytes, cls: type[msgspec.Struct]) -> tuple[msgspec.Struct | None, codec.InboundDecoder]:
    decoder = codec.InboundDecoder()
    topic = samples.topic_for(samples.sample(cls))
    return decoder.decode(topic, raw), decoder


def test_every_message_has_a_sample_and_a_family() -> None:
    """Pins that a new message class cannot skip conformance: each needs a sample and a topic family."""
    for cls in MESSAGE_CLASSES:
        assert isinstance(samples.sample(cls), cls)
        assert samples.family_of(cls) in ("state", "inventory", "telemetry", "events", "cmd", "reply")


def test_tags_are_unique() -> None:
    """Pins that no two message classes share a ``kind``, so tagged unions stay unambiguous."""
    tags = [samples.tag_of(cls) for cls in MESSAGE_CLASSES]
    assert len(tags) == len(set(tags)), tags


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=ids)
def test_round_trip_through_inbound_decoder(cls: type[msgspec.Struct]) -> None:
    """Pins that codec.encode and InboundDecoder on the message's topic family round-trip it exactly."""
    message = samples.sample(cls)
    decoded, decoder = _decode(codec.encode(message), cls)
    assert decoded == message
    assert type(decoded) is cls
    assert decoder.stats.ok == 1
    assert decoder.stats.rejected == 0


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=ids)
def test_reference_codec_reads_our_bytes(cls: type[msgspec.Struct]) -> None:
    """Pins the bytes on the wire: msgpack reads a map with ``kind`` first and every field in order."""
    message = samples.sample(cls)
    unpacked = msgpack.unpackb(codec.encode(message), raw=False)
    assert isinstance(unpacked, dict)
    assert unpacked["kind"] == samples.tag_of(cls)
    assert list(unpacked) == ["kind", *cls.__struct_fields__]
    for name in cls.__struct_fields__:
        assert unpacked[name] == msgspec.to_builtins(getattr(message, name)), name
    assert unpacked == _builtins(message)


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=ids)
def test_our_decoder_reads_reference_bytes(cls: type[msgspec.Struct]) -> None:
    """Pins that bytes packed by msgpack from plain data decode into the same message."""
    message = samples.sample(cls)
    raw = msgpack.packb(_builtins(message), use_bin_type=True)
    decoded, decoder = _decode(raw, cls)
    assert decoded == message, decoder.stats.by_reason


def test_array_like_telemetry_is_positional_on_the_wire() -> None:
    """Pins VmTelemetry as a positional array (name, cpu_util, dirty_mib_s, memory_mib): small telemetry."""
    message = samples.sample(messages.HostTelemetry)
    unpacked = msgpack.unpackb(codec.encode(message), raw=False)
    assert unpacked["vms"][0] == ["web-1", 0.35, 12.5, 2048]


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=ids)
def test_unknown_fields_are_ignored(cls: type[msgspec.Struct]) -> None:
    """Pins forward compatibility: a newer peer's extra fields (top level, nested) do not break decoding."""
    message = samples.sample(cls)
    data = _builtins(message)
    data["added_in_a_later_version"] = {"nested": [1, 2, 3], "flag": True}
    if isinstance(data.get("spec"), dict):
        data["spec"]["future_device"] = "virtio-gpu"
    if isinstance(data.get("vms"), list) and data["vms"] and isinstance(data["vms"][0], dict):
        data["vms"][0]["spec"]["future_device"] = "virtio-gpu"
    decoded, decoder = _decode(msgpack.packb(data), cls)
    assert decoded == message, decoder.stats.by_reason


def _defaulted_fields(cls: type[msgspec.Struct]) -> list[tuple[type[msgspec.Struct], str, Any]]:
    cases = []
    for field in msgspec.structs.fields(cls):
        if field.default is not msgspec.NODEFAULT:
            cases.append((cls, field.encode_name, field.default))
        elif field.default_factory is not msgspec.NODEFAULT:
            cases.append((cls, field.encode_name, field.default_factory()))
    return cases


DEFAULTED = [case for cls in MESSAGE_CLASSES for case in _defaulted_fields(cls)]


@pytest.mark.parametrize(
    ("cls", "name", "default"), DEFAULTED, ids=[f"{c.__name__}.{n}" for c, n, _ in DEFAULTED]
)
def test_missing_defaulted_field_takes_its_default(
    cls: type[msgspec.Struct], name: str, default: Any
) -> None:
    """Pins backward compatibility: an older peer that never sends a defaulted field is understood."""
    data = _builtins(samples.sample(cls))
    del data[name]
    decoded, decoder = _decode(msgpack.packb(data), cls)
    assert decoded is not None, decoder.stats.by_reason
    assert getattr(decoded, name) == default


def test_missing_required_field_is_rejected_not_defaulted() -> None:
    """Pins that a required field cannot silently go missing: the message is refused as wrong_type."""
    data = _builtins(samples.sample(messages.HostTelemetry))
    del data["seq"]
    decoded, decoder = _decode(msgpack.packb(data), messages.HostTelemetry)
    assert decoded is None
    assert decoder.stats.by_reason["wrong_type"] == 1
