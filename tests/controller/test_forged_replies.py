"""A reply counts only from the host its command went to: another host's reply for the same
operation id (on its own reply topic, where its credentials let it publish) is counted as forged
and completes nothing. Real Mosquitto, an in-process controller and sim agents.
"""

from __future__ import annotations

import asyncio
import time

from protocols import codec, messages, topics
from protocols.bus import Bus, BusSettings
from protocols.vmspec import VmSpec
from tests.support.fleet import FAST_BUS, Fleet, eventually


def _as_h1(url: str) -> Bus:
    return Bus(BusSettings(url=url, client_id="h1-impostor", **FAST_BUS))  # type: ignore[arg-type]


async def test_a_reply_from_another_host_does_not_complete_the_exchange(mosquitto, tmp_path):
    """With h2 stopped, h1's reply for h2's prepare (naming h1 or h2) is refused; h2's own reply counts."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        await fleet.add_agent("h2")
        await fleet.stop_agent("h2")
        ctl = fleet.ctl
        await eventually(lambda: (h := ctl.store.host("h2")) is not None and not h.online, 5, "h2 offline")
        command = messages.PrepareMigration(
            op_id="mig-1", deadline=time.time() + 30, spec=VmSpec(name="web-1"), source_host="h1"
        )
        exchange = asyncio.create_task(ctl.rpc.exchange("h2", command))
        await asyncio.sleep(0.1)
        async with _as_h1(mosquitto.url) as h1:
            await h1.wait_connected(5)
            for claimed in ("h1", "h2"):
                forged = messages.Reply(
                    op_id="mig-1", host_id=claimed, ok=True, ts=time.time(), uri="tcp:203.0.113.9:4444"
                )
                await h1.publish(topics.host_topic("h1", "reply"), codec.encode(forged), qos=1)
            await eventually(lambda: ctl.rpc.forged["h1"] + ctl.intake.decoder.stats.rejected >= 2, 5, "both")
            assert ctl.rpc.forged["h1"] == 1, "the one naming h2 on h1's topic is the decoder's wrong_sender"
            await asyncio.sleep(0.3)
            assert not exchange.done(), "a forged reply completed h2's exchange"
            genuine = messages.Reply(
                op_id="mig-1", host_id="h2", ok=True, ts=time.time(), uri="tcp:10.0.0.2:1"
            )
            await h1.publish(topics.host_topic("h2", "reply"), codec.encode(genuine), qos=1)
            reply = await asyncio.wait_for(exchange, 5)
        assert reply is not None and reply.uri == "tcp:10.0.0.2:1"


async def test_an_early_forged_reply_is_not_kept_for_the_exchange(mosquitto, tmp_path):
    """A reply that comes before its exchange begins is used only if its host is the command's."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        ctl = fleet.ctl
        async with _as_h1(mosquitto.url) as h1:
            await h1.wait_connected(5)
            forged = messages.Reply(op_id="op-early", host_id="h1", ok=False, ts=time.time(), error="forged")
            await h1.publish(topics.host_topic("h1", "reply"), codec.encode(forged), qos=1)
            await eventually(lambda: "op-early" in ctl.rpc._early, 5, "the early reply kept")
        await fleet.add_agent("h2")
        command = messages.DefineVm(op_id="op-early", deadline=time.time() + 30, spec=VmSpec(name="early"))
        reply = await asyncio.wait_for(ctl.rpc.exchange("h2", command), 10)
        assert reply is not None and reply.ok and reply.host_id == "h2"
        assert ctl.rpc.forged["h1"] == 1
