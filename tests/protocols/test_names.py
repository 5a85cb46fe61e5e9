r"""Names match as a whole: a trailing newline, a carriage return or a NUL never passes for a name.

msgspec checks ``Meta(pattern=...)`` with ``re.search``, where ``$`` also matches before a final
newline: ``^[a-z0-9-]+$`` took "vm-a\\n", and QEMU ran in a directory named with a newline. The
patterns end in ``\\Z`` now. Checked at every edge: msgspec decode, a wire message through the
agent's InboundDecoder, the REST API of a real controller, and the CLI's spec files.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import fleetvisor
from controller import cli as operator_cli
from protocols import codec, messages, topics, vmspec
from protocols.vmspec import (
    HOST_ID_RE,
    VM_NAME_RE,
    HostId,
    VmSpec,
    VmSpecInput,
    explain_validation_error,
    vm_name_problem,
)
from tests.support import samples
from tests.support.brokers import MosquittoBroker
from tests.support.fleet import Fleet

#: Each trick against each kind of name: what it looks like once a newline is stripped by ``$``.
TRICKS = ("\n", "\r", "\x00", "\r\n")


def _pattern_schemas() -> list[str]:
    """Every ``pattern`` in the JSON schema of the wire messages and the operator's spec."""
    _, components = msgspec.json.schema_components((*messages.ALL_MESSAGES, VmSpecInput))
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                found.append(node["pattern"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(components)
    return found


def test_every_protocol_pattern_is_anchored_at_the_very_end() -> None:
    """Pins that no pattern of protocols/ ends in ``$`` (which matches before a final newline)."""
    patterns = _pattern_schemas()
    assert len(patterns) >= 6, patterns
    for pattern in patterns:
        assert pattern.startswith("^") and pattern.endswith(r"\Z"), pattern
        assert not re.search(pattern, "a" * 3 + "\n"), pattern


@pytest.mark.parametrize("trick", TRICKS, ids=repr)
@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("$.name", lambda t: {"name": f"vm-a{t}"}),
        ("$.labels", lambda t: {"name": "vm-a", "labels": {f"web{t}": "1"}}),
        ("$.disks[0].target", lambda t: {"name": "vm-a", "disks": [{"target": f"vda{t}", "source": "/i/a"}]}),
        ("$.nics[0].device", lambda t: {"name": "vm-a", "nics": [{"mode": "tap", "device": f"tap0{t}"}]}),
        ("$.cpu_model", lambda t: {"name": "vm-a", "cpu_model": f"Skylake{t}"}),
        ("$.nics[0].mac", lambda t: {"name": "vm-a", "nics": [{"mac": f"52:54:00:12:34:56{t}"}]}),
    ],
)
def test_the_spec_refuses_names_with_a_trailing_control_character(field: str, body: Any, trick: str) -> None:
    """Pins that VmSpecInput (REST and CLI) and VmSpec (the wire) refuse each trick, naming the field."""
    raw = msgspec.json.encode(body(trick))
    for type_ in (VmSpecInput, VmSpec):
        with pytest.raises(msgspec.ValidationError) as refused:
            msgspec.json.decode(raw, type=type_)
        assert field.split("[")[0] in str(refused.value), str(refused.value)


@pytest.mark.parametrize("trick", TRICKS, ids=repr)
def test_host_ids_and_python_checks_match_the_whole_string(trick: str) -> None:
    """Pins HostId (msgspec) and the compiled regexes with fullmatch: h1 passes, h1 plus a trick does not."""
    assert msgspec.convert("h1", HostId) == "h1"
    with pytest.raises(msgspec.ValidationError) as refused:
        msgspec.convert(f"h1{trick}", HostId)
    assert explain_validation_error(refused.value).startswith("Expected a host id")
    assert HOST_ID_RE.search(f"h1{trick}") is None
    assert VM_NAME_RE.search(f"vm-a{trick}") is None
    assert vm_name_problem(f"vm-a{trick}") is not None


def test_a_define_command_for_a_name_with_a_newline_is_refused_off_the_wire() -> None:
    r"""Pins that the agent's InboundDecoder drops a DefineVm whose VM is named "vm-a\\n" (counted)."""
    good = samples.sample(messages.DefineVm)
    topic = topics.host_topic(samples.HOST_ID, "cmd")
    decoder = codec.InboundDecoder()
    assert decoder.decode(topic, codec.encode(good)) is not None
    bad = msgspec.structs.replace(good, spec=msgspec.structs.replace(good.spec, name="vm-a\n"))
    assert decoder.decode(topic, codec.encode(bad)) is None
    assert dict(decoder.stats.by_reason) == {"wrong_type": 1}


async def test_the_rest_api_refuses_names_with_control_characters(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    r"""POST /vms with "vm-a\\n", a host "h1\\n" or a label "web\\r" gets 400 naming the field; nothing is created."""
    bodies = {
        "$.name": {"name": "vm-a\n"},
        "$.name ": {"name": "vm\x00a"},
        "$.scheduling.start_on": {"name": "vm-a", "scheduling": {"start_on": "h1\n"}},
        "$.scheduling.hosts[0]": {"name": "vm-a", "scheduling": {"hosts": ["h1\n"]}},
        "`key` in `$.labels`": {"name": "vm-a", "labels": {"web\r": "x"}},
    }
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=30) as client:
            for field, body in bodies.items():
                response = await client.post("/vms", json=body, params={"wait": 10})
                assert response.status_code == 400, (body, response.text)
                error = response.json()["error"]
                assert error["code"] == "invalid_body" and field.strip() in error["message"], error
            assert (await client.get("/vms")).json() == []
            assert (await client.post("/vms", json={"name": "vm-a"}, params={"wait": 10})).status_code == 200


async def test_the_cli_refuses_a_spec_file_with_a_bad_name_before_any_request(
    mosquitto: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r"""`fleetvisor vm create -f spec.json` with name "vm-a\\n" fails locally naming the field."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"name": "vm-a\n"}))
    async with Fleet(mosquitto.url, tmp_path / "fleet") as fleet:
        args = fleetvisor.build_parser().parse_args(
            ["vm", "create", "-f", str(spec_file), "--url", fleet.api_url]
        )
        code = await asyncio.to_thread(operator_cli.run_operator_command, args)
        out = capsys.readouterr()
        assert code != 0
        assert "$.name" in out.err and "a VM name" in out.err, out.err
        assert fleet.ctl.store.vms() == []


def test_the_vm_spec_module_has_no_dollar_anchored_pattern() -> None:
    """Pins the source itself: a new ``$``-anchored pattern in protocols/vmspec.py fails here first."""
    source = Path(vmspec.__file__).read_text()
    assert not re.findall(r'r"\^[^"]*\$"', source)
