"""Bad input at the receiving edge: InboundDecoder refuses it, counts it, logs it, and never raises.

Also the operator-facing side of the VM spec: VmSpecInput refuses misspelt fields and out-of-range
values with messages that name the field.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import codec, messages, topics
from protocols.vmspec import VmSpec, VmSpecInput, vm_name_problem
from tests.support import samples

HOST = samples.HOST_ID


def _telemetry_dict() -> dict[str, Any]:
    data = msgspec.to_builtins(samples.sample(messages.HostTelemetry))
    assert isinstance(data, dict)
    return data


def _bad_cases() -> list[tuple[str, str, bytes, str, str]]:
    """(case id, topic, payload, expected reason, host counted)."""
    telemetry_topic = topics.host_topic(HOST, "telemetry")
    good = codec.encode(samples.sample(messages.HostTelemetry))
    wrong_type = _telemetry_dict() | {"seq": "not-a-number"}
    unknown_kind = _telemetry_dict() | {"kind": "telemetry_v9"}
    other_sender = samples.sample(messages.VmEvent)
    return [
        ("truncated", telemetry_topic, good[:-5], "truncated", HOST),
        ("garbage", telemetry_topic, b"\xc1\xc1\xc1 not msgpack", "garbage", HOST),
        ("unknown_kind", telemetry_topic, msgpack.packb(unknown_kind), "unknown_kind", HOST),
        (
            "command_without_kind",
            topics.host_topic(HOST, "cmd"),
            msgpack.packb({"op_id": "op-1", "vm": "web-1"}),
            "unknown_kind",
            HOST,
        ),
        ("wrong_field_type", telemetry_topic, msgpack.packb(wrong_type), "wrong_type", HOST),
        ("not_a_map", telemetry_topic, msgpack.packb([1, 2, 3]), "wrong_type", HOST),
        ("oversize", telemetry_topic, b"\x00" * (codec.MAX_PAYLOAD_BYTES + 1), "oversize", HOST),
        (
            "wrong_sender",
            topics.host_topic("intruder-9", "events"),
            codec.encode(other_sender),
            "wrong_sender",
            "intruder-9",
        ),
        ("foreign_topic", "zigbee2mqtt/lamp/set", good, "bad_topic", "?"),
        ("other_version", f"fv/v2/host/{HOST}/telemetry", good, "bad_topic", "?"),
        ("unknown_family", f"fv/v1/host/{HOST}/secrets", good, "bad_topic", "?"),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize(
    ("topic", "payload", "reason", "host"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_input_is_refused_counted_and_logged(
    topic: str, payload: bytes, reason: str, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Pins that bad input gives None, one count under its reason and host, and a warning naming the topic."""
    decoder = codec.InboundDecoder()
    with caplog.at_level(logging.WARNING, logger="protocols.codec"):
        assert decoder.decode(topic, payload) is None
    assert dict(decoder.stats.by_reason) == {reason: 1}
    assert dict(decoder.stats.by_host) == {host: 1}
    assert decoder.stats.ok == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "protocols.codec"]
    assert len(warnings) == 1
    assert topic in warnings[0].getMessage()
    assert reason.replace("_", " ") in warnings[0].getMessage()


def test_oversize_respects_a_custom_cap() -> None:
    """Pins that max_bytes is the cap: a good message one byte over it is refused as oversize."""
    raw = codec.encode(samples.sample(messages.HostState))
    topic = samples.topic_for(samples.sample(messages.HostState))
    assert codec.InboundDecoder(max_bytes=len(raw)).decode(topic, raw) is not None
    tight = codec.InboundDecoder(max_bytes=len(raw) - 1)
    assert tight.decode(topic, raw) is None
    assert tight.stats.by_reason == {"oversize": 1}


def test_a_valid_message_on_the_wrong_family_is_refused() -> None:
    """Pins that a HostState published on a telemetry topic is not accepted as telemetry."""
    decoder = codec.InboundDecoder()
    raw = codec.encode(samples.sample(messages.HostState))
    assert decoder.decode(topics.host_topic(HOST, "telemetry"), raw) is None
    assert decoder.stats.by_reason == {"unknown_kind": 1}


def test_commands_have_no_sender_check_but_replies_do() -> None:
    """Pins that commands decode on any host's cmd topic, while a reply must come from the host it names."""
    decoder = codec.InboundDecoder()
    command = samples.sample(messages.StartVm)
    assert decoder.decode(topics.host_topic("any-host", "cmd"), codec.encode(command)) == command
    reply = samples.sample(messages.Reply)
    assert decoder.decode(topics.host_topic("any-host", "reply"), codec.encode(reply)) is None
    assert decoder.stats.by_reason == {"wrong_sender": 1}


def test_warnings_are_rate_limited_but_every_drop_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    """Pins that a flood of junk logs once per reason per interval while the counters keep counting."""
    decoder = codec.InboundDecoder(log_every_s=3600.0)
    topic = topics.host_topic(HOST, "telemetry")
    with caplog.at_level(logging.WARNING, logger="protocols.codec"):
        for _ in range(50):
            assert decoder.decode(topic, b"\xc1") is None
        truncated = codec.encode(samples.sample(messages.HostTelemetry))[:-3]
        assert decoder.decode(topic, truncated) is None  # a different reason gets its own line
    assert decoder.stats.by_reason == {"garbage": 50, "truncated": 1}
    assert decoder.stats.rejected == 51
    assert decoder.stats.by_host == {HOST: 51}
    assert len([r for r in caplog.records if r.name == "protocols.codec"]) == 2


def test_good_messages_are_counted_as_ok() -> None:
    """Pins stats.ok, so dashboards can show the share of bad input."""
    decoder = codec.InboundDecoder()
    for cls in messages.ALL_MESSAGES:
        message = samples.sample(cls)
        assert decoder.decode(samples.topic_for(message), codec.encode(message)) == message
    assert decoder.stats.ok == len(messages.ALL_MESSAGES)
    assert decoder.stats.rejected == 0


_FAMILY = st.sampled_from(topics.FAMILIES)


def _decode_once(decoder: codec.InboundDecoder, topic: str, payload: bytes) -> None:
    """Decode, which must return a message or None (never raise), and count exactly one outcome."""
    result = decoder.decode(topic, payload)
    assert result is None or isinstance(result, msgspec.Struct)
    assert decoder.stats.ok + decoder.stats.rejected == 1


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=_FAMILY, payload=st.binary(max_size=512))
def test_arbitrary_bytes_never_raise(family: topics.Family, payload: bytes) -> None:
    """Pins that decode() returns a message or None for any bytes, and counts every refusal."""
    decoder = codec.InboundDecoder(log_every_s=3600.0)
    _decode_once(decoder, topics.host_topic(HOST, family), payload)


@settings(max_examples=200, deadline=None)
@given(
    cls=st.sampled_from(messages.ALL_MESSAGES),
    data=st.data(),
)
def test_mutated_good_messages_never_raise(cls: type[msgspec.Struct], data: st.DataObject) -> None:
    """Pins that near-valid input (a good message with bytes flipped, cut or appended) never raises."""
    message = samples.sample(cls)
    raw = bytearray(codec.encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    payload = bytes(raw[:cut]) + data.draw(st.binary(max_size=16))
    decoder = codec.InboundDecoder(log_every_s=3600.0)
    _decode_once(decoder, samples.topic_for(message), payload)


def test_invalid_utf8_in_a_string_is_refused_not_raised() -> None:
    """Pins that a string field holding invalid UTF-8 is refused as garbage, not raised."""
    raw = codec.encode(samples.sample(messages.HostState))
    boot_id = samples.BOOT_ID.encode()
    bad = raw.replace(boot_id, b"\xff" + boot_id[1:])
    assert bad != raw
    decoder = codec.InboundDecoder()
    assert decoder.decode(samples.topic_for(samples.sample(messages.HostState)), bad) is None
    assert decoder.stats.by_reason == {"garbage": 1}


def test_deeply_nested_unknown_field_is_refused_not_raised() -> None:
    """Pins that a small payload nesting 10,000 arrays in an unknown field is refused, not raised."""
    data = msgspec.to_builtins(samples.sample(messages.HostState))
    head = msgpack.packb(data)
    # One more map entry: "x" -> [[[[...nil...]]]] (about 10 KB, far below the size cap).
    raw = bytes([head[0] + 1]) + head[1:] + msgpack.packb("x") + b"\x91" * 10_000 + b"\xc0"
    decoder = codec.InboundDecoder()
    assert decoder.decode(samples.topic_for(samples.sample(messages.HostState)), raw) is None
    assert decoder.stats.by_reason == {"garbage": 1}


# -- operator input: VmSpecInput ---------------------------------------------------------------


def _spec_error(data: dict[str, Any]) -> str:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, VmSpecInput)
    return str(info.value)


def test_spec_input_rejects_a_misspelt_field() -> None:
    """Pins that operator input with an unknown field is an error naming that field."""
    assert _spec_error({"name": "web-1", "cpus": 2}) == "Object contains unknown field `cpus`"


def test_wire_spec_ignores_the_unknown_field_that_input_rejects() -> None:
    """Pins the split: the wire VmSpec ignores unknown fields (forward compatible), VmSpecInput does not."""
    spec = msgspec.convert({"name": "web-1", "cpus": 2}, VmSpec)
    assert spec == VmSpec(name="web-1")


@pytest.mark.parametrize(
    "name", ["-web", "web-", "", "a" * 64, "web 1", "wéb", ".hidden", "web.", "_web", "a/b", "a:b", "a,b"]
)
def test_spec_input_rejects_bad_names(name: str) -> None:
    """Pins that names outside [A-Za-z0-9._-]{1,63}, or not starting and ending with a letter or digit,
    fail at `$.name`; vm_name_problem agrees.
    """
    message = _spec_error({"name": name})
    assert "`$.name`" in message
    assert message.startswith("Expected `str` matching regex")
    problem = vm_name_problem(name)
    assert problem is not None and repr(name) in problem


@pytest.mark.parametrize(
    "name", ["a", "web-1", "db0", "x" * 63, "QEMUGuest1", "fedora-38", "win10_x64", "rhel9.2"]
)
def test_spec_input_accepts_good_names(name: str) -> None:
    """Pins the accepted name shapes, including the 1- and 63-character edges."""
    assert msgspec.convert({"name": name}, VmSpecInput).name == name
    assert vm_name_problem(name) is None


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("vcpus", 0, "Expected `int` >= 1 - at `$.vcpus`"),
        ("vcpus", 513, "Expected `int` <= 512 - at `$.vcpus`"),
        ("memory_mib", 8, "Expected `int` >= 16 - at `$.memory_mib`"),
        ("vcpus", "two", "Expected `int`, got `str` - at `$.vcpus`"),
        ("arch", "sparc", "Invalid enum value 'sparc' - at `$.arch`"),
    ],
)
def test_spec_input_rejects_out_of_range_values(field: str, value: Any, expected: str) -> None:
    """Pins readable range and type errors that name the field, e.g. vcpus=0."""
    assert _spec_error({"name": "web-1", field: value}) == expected


def test_spec_input_rejects_bad_workload_nested() -> None:
    """Pins that nested constraints report their path (workload.cpu_util must be within 0..1)."""
    message = _spec_error({"name": "web-1", "workload": {"cpu_util": 1.5}})
    assert message == "Expected `float` <= 1.0 - at `$.workload.cpu_util`"


def test_spec_input_converts_to_the_wire_spec() -> None:
    """Pins that a valid VmSpecInput becomes an equal plain VmSpec for the bus."""
    data = msgspec.to_builtins(samples.vm_spec())
    spec = msgspec.convert(data, VmSpecInput).to_spec()
    assert type(spec) is VmSpec
    assert spec == samples.vm_spec()
