"""Text a host writes cannot forge lines or steer a terminal: control, format and separator
characters are escaped (protocols.text.printable) in the controller's event log line and in what the
CLI prints, while the store keeps the text as sent. Real Mosquitto, an in-process controller and a
sim agent; the CLI runs through its entry point against the fleet's API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import msgspec
import pytest

import fleetvisor
from controller import cli as operator_cli
from protocols import codec, messages, topics
from protocols.bus import Bus, BusSettings
from protocols.text import printable
from protocols.vmspec import VmSpec
from tests.support.brokers import MosquittoBroker
from tests.support.fleet import FAST_BUS, Fleet, eventually

#: Every character that moves to a new line, returns the cursor or starts a terminal sequence.
RAW = ("\n", "\r", "\x1b", "\x9b", "\x85", "\u2028", "\u2029", "\u202e", "\x7f", "\x00")
FORGED_REASON = (
    "guest said bye\n12:00:00 #99    vm.started           vm db-1 started on h2\x1b[31m\r\u2028\u202e"
)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, café, 日本", "plain text, café, 日本"),
        ("a\nb\r\nc\td", "a\\nb\\r\\nc\\td"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("nul\x00 del\x7f csi\x9b nel\x85", "nul\\x00 del\\x7f csi\\x9b nel\\x85"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("\u202eevil\u202c \u2066iso\u2069 \u200bzw", "\\u202eevil\\u202c \\u2066iso\\u2069 \\u200bzw"),
        ("tag\U000e0041", "tag\\U000e0041"),
    ],
)
def test_printable_escapes_what_moves_or_colours_a_line(text: str, shown: str) -> None:
    """C0, DEL, C1, ESC, line and paragraph separators, bidi and zero-width characters become escapes."""
    assert printable(text) == shown
    assert printable(shown) == shown, "escaping twice changes nothing"
    assert shown.isprintable()


def _impostor(url: str) -> Bus:
    return Bus(BusSettings(url=url, client_id="h1-impostor", **FAST_BUS))  # type: ignore[arg-type]


async def test_an_event_reason_with_newlines_and_ansi_is_logged_on_one_line(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """h1's crash event with a forged second line and ANSI codes logs and prints (`fleetvisor events`)
    as one escaped line; stored as sent.
    """
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        ctl = fleet.ctl
        _, op, _ = ctl.vms.create(VmSpec(name="web-1", memory_mib=256))
        assert (await ctl.operations.wait(op.op_id, 10)).state == "succeeded"
        event = messages.VmEvent(
            host_id="h1", seq=10**6, ts=time.time(), vm="web-1", event="crashed", state="crashed",
            reason=FORGED_REASON,
        )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="controller.state.events"):
            async with _impostor(mosquitto.url) as bus:
                await bus.wait_connected(5)
                await bus.publish(topics.host_topic("h1", "events"), codec.encode(event), qos=1)
                await eventually(
                    lambda: any("vm.crashed" in r.getMessage() for r in caplog.records), 5, "the event"
                )
        [line] = [r.getMessage() for r in caplog.records if "vm.crashed" in r.getMessage()]
        assert not any(ch in line for ch in RAW), repr(line)
        assert "guest said bye\\n12:00:00 #99" in line and "\\x1b[31m" in line, line
        [stored] = [e for e in ctl.store.events_since(0) if e.type == "vm.crashed"]
        assert FORGED_REASON in stored.message, "the store keeps the original text"
        printed = await _cli(capsys, "events", "--url", fleet.api_url)
    [row] = [r for r in printed.splitlines() if "vm.crashed" in r]
    assert "guest said bye\\n12:00:00 #99" in row and "\\x1b[31m" in row, row
    assert not any(ch in printed for ch in RAW if ch != "\n"), repr(printed)


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    args = fleetvisor.build_parser().parse_args(list(argv))
    code = await asyncio.to_thread(operator_cli.run_operator_command, args)
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out


async def test_the_cli_prints_a_hosts_forged_text_escaped(
    mosquitto: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`host show` and `host list` print cpu model, arch, version and labels with control codes escaped."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        ctl = fleet.ctl
        genuine = ctl.live.inventories["h1"]
        caps = msgspec.structs.replace(
            genuine.capabilities, cpu_model="Xeon\nstate:         offline\x1b[2J", arch="x86_64\x1b[31m"
        )
        forged = msgspec.structs.replace(
            genuine, seq=genuine.seq + 1, capabilities=caps, agent_version="1.0\r\x1b[K",
            labels={"zone": "a\u2028labels:        zone=b"},
        )  # fmt: skip
        async with _impostor(mosquitto.url) as bus:
            await bus.wait_connected(5)
            await bus.publish(topics.host_topic("h1", "inventory"), codec.encode(forged), qos=1, retain=True)
            await eventually(
                lambda: (
                    (h := ctl.store.host("h1")) is not None and h.capabilities.cpu_model == caps.cpu_model
                ),
                5,
                "the forged inventory taken",
            )
        url = ["--url", fleet.api_url]
        shown = await _cli(capsys, "host", "show", "h1", *url)
        listed = await _cli(capsys, "host", "list", *url)
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=30) as client:
            assert (await client.get("/hosts/h1")).json()["capabilities"]["cpu_model"] == caps.cpu_model
    for out in (shown, listed):
        assert not any(ch in out for ch in RAW if ch != "\n") and out.endswith("\n"), repr(out)
    assert "Xeon\\nstate:" in shown and "1.0\\r\\x1b[K" in shown and "a\\u2028labels:" in shown, shown
    assert [line.split(":")[0] for line in shown.splitlines()].count("state") == 1, shown
    assert len(listed.splitlines()) == 2 and "x86_64\\x1b[31m" in listed, listed
