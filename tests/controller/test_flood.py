"""A host that floods the bus is rate-limited and counted; the other hosts are not starved."""

from __future__ import annotations

import asyncio
import os
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


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def test_a_telemetry_flood_never_gets_healthy_neighbours_suspected(mosquitto, tmp_path):
    """10 s of thousands of telemetry messages a second with h1's identity: h2 and h3 stay up the whole
    time, h1's messages are limited before they queue, and the flood costs bounded memory.
    """
    flood_s = 10.0
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        for host_id in ("h1", "h2", "h3"):
            await fleet.add_agent(host_id)
        ctl = fleet.ctl
        detector = ctl.ha.detector
        await eventually(lambda: all(detector.state(h) == "up" for h in ("h2", "h3")), 5, "h2, h3 up")
        await asyncio.sleep(1.0)  # a few heartbeat intervals for the detector to learn
        payload = codec.encode(
            HostTelemetry(host_id="h1", seq=1, ts=time.time(), cpu_util=0.1, memory_used_mib=0, power_w=1.0)
        )
        topic = topics.host_topic("h1", "telemetry")
        seen: set[tuple[str, str]] = set()
        rss_before, rss_peak = _rss_mib(), 0.0
        samples_before = ctl.live.telemetry_count
        sent, silence = 0, 0.0
        flooder = Bus(BusSettings(url=mosquitto.url, client_id="h1-flood", **FAST_BUS))  # type: ignore[arg-type]
        async with flooder:
            await flooder.wait_connected(5)
            end = time.monotonic() + flood_s
            while time.monotonic() < end:
                for _ in range(1000):
                    sent += flooder.publish_nowait(topic, payload)
                now = time.monotonic()
                seen.update((h, detector.state(h)) for h in ("h2", "h3"))
                silence = max(silence, *(now - ctl.ha.last_heartbeat[h] for h in ("h2", "h3")))
                rss_peak = max(rss_peak, _rss_mib())
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        seen.update((h, detector.state(h)) for h in ("h2", "h3"))
        assert seen == {("h2", "up"), ("h3", "up")}, f"neighbours left 'up' during the flood: {seen}"
        assert silence < 1.0, f"a neighbour's heartbeat went unseen for {silence:.1f}s (it sends every 0.2s)"
        ha_events = [e for e in ctl.store.events_since(0, 10_000) if e.host_id in ("h2", "h3")]
        assert not [e for e in ha_events if e.type.startswith(("host.suspect", "host.failed", "ha."))]
        assert sent >= 20_000, f"the flood was too small to mean anything ({sent} messages)"
        dropped = ctl.intake.limiter.dropped["h1"]
        assert dropped >= sent // 2, f"only {dropped} of {sent} flood messages were limited"
        # What passed: h1 within its bucket (20/s, burst 50), and the three agents' own samples.
        samples = ctl.live.telemetry_count - samples_before
        assert samples <= (20 + 3 * 5) * (flood_s + 1) + 50 + 20, samples
        assert ctl.telemetry_bus.inbound.peak <= 1_000, "the flood queued up before its limit"
        assert rss_peak - rss_before < 64, f"the flood cost {rss_peak - rss_before:.0f} MiB"
