"""A host that floods the bus is rate-limited and counted; the other hosts are not starved."""

from __future__ import annotations

import asyncio
import time

from controller.intake.rate_limit import InboundLimiter, RateLimits
from protocols import codec, topics
from protocols.bus import Bus, BusSettings
from protocols.messages import HostTelemetry
from tests.support.fleet import FAST_BUS, Fleet, eventually


def test_token_bucket_allows_the_burst_then_the_rate():
    """A bucket passes its burst at once, then refuses until tokens refill at the set rate."""
    now = [1000.0]
    limiter = InboundLimiter(RateLimits(per_family={"telemetry": (10.0, 5.0)}), clock=lambda: now[0])
    passed = sum(limiter.allow("h1", "telemetry") for _ in range(20))
    assert passed == 5 and limiter.dropped["h1"] == 15
    assert limiter.allow("h2", "telemetry"), "another host has its own bucket"
    now[0] += 0.25  # 2.5 tokens at 10/s: two whole messages, and half a token carried over
    assert sum(limiter.allow("h1", "telemetry") for _ in range(10)) == 2
    now[0] += 0.1  # one new token plus the carried half: one more passes, the half stays
    assert limiter.allow("h1", "telemetry") and not limiter.allow("h1", "telemetry")
    now[0] += 60.0  # a long quiet spell refills only up to the burst
    assert sum(limiter.allow("h1", "telemetry") for _ in range(20)) == 5


async def test_a_flooding_host_is_limited_while_its_neighbour_keeps_reporting(mosquitto, tmp_path):
    """20,000 telemetry messages from one host are mostly dropped; a normal host's samples keep arriving."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("calm")
        rogue = Bus(BusSettings(url=mosquitto.url, client_id="rogue", **FAST_BUS))  # type: ignore[arg-type]
        async with rogue:
            await rogue.wait_connected(5)
            payload = codec.encode(
                HostTelemetry(
                    host_id="rogue", seq=1, ts=time.time(), cpu_util=0.1, memory_used_mib=0, power_w=1.0
                )
            )
            topic = topics.host_topic("rogue", "telemetry")
            ctl = fleet.ctl
            calm_before = await eventually(
                lambda: ctl.live.telemetry_seen.get("calm"), 5, "calm's first sample"
            )
            for i in range(20_000):
                rogue.publish_nowait(topic, payload)
                if i % 500 == 0:
                    await asyncio.sleep(0)
            await eventually(lambda: ctl.intake.limiter.dropped["rogue"] >= 15_000, 10, "the flood dropped")
            await eventually(
                lambda: ctl.live.telemetry_seen["calm"] > calm_before + 0.5, 5, "calm still reporting"
            )
        assert ctl.intake.limiter.dropped["calm"] == 0
        assert ctl.ha.detector.state("calm") == "up"


async def test_an_inventory_over_the_rate_is_held_back_not_lost(mosquitto, tmp_path):
    """A burst of inventories beyond the limit: the newest one is still reconciled, a moment later."""
    from agent.daemon import AGENT_VERSION
    from protocols.messages import Capabilities, HostInventory, VmStatus
    from protocols.vmspec import VmSpec

    async with Fleet(mosquitto.url, tmp_path) as fleet:
        ctl = fleet.ctl
        ctl.intake.limiter.limits.per_family["inventory"] = (2.0, 2.0)
        caps = Capabilities(engine="sim", arch="x86_64", accel="sim", cores=4, memory_mib=8192)
        bus = Bus(BusSettings(url=mosquitto.url, client_id="burst", **FAST_BUS))  # type: ignore[arg-type]
        async with bus:
            await bus.wait_connected(5)
            for seq in range(1, 11):
                vms = [
                    VmStatus(name=f"vm-{i}", state="running", spec=VmSpec(name=f"vm-{i}")) for i in range(seq)
                ]
                inventory = HostInventory(
                    host_id="burst", boot_id="b", seq=seq, ts=time.time(), agent_version=AGENT_VERSION,
                    address="127.0.0.1", capabilities=caps, vms=vms,
                )  # fmt: skip
                await bus.publish(topics.host_topic("burst", "inventory"), codec.encode(inventory), qos=1)
            await eventually(
                lambda: (i := ctl.live.inventories.get("burst")) is not None and i.seq == 10, 5, "seq 10"
            )
        assert len(ctl.store.vms("burst")) == 10
