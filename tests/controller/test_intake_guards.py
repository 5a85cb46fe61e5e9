"""A host with valid credentials cannot fool the controller's intake: forged sequence numbers, name
squatting, mass adoption, bad numbers, events about other hosts' VMs, event floods in bytes, and
retained news. Real SQLite stores, and a real Mosquitto where the bus is part of the attack.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import msgspec
import pytest

from controller.hardware import EnergyMeter
from controller.intake.guards import GuardSettings, SequenceGuard
from controller.intake.rate_limit import InboundLimiter, RateLimits
from controller.services.power.energy import EnergyCounter
from controller.services.power.settings import PowerSettings
from controller.state.events import EventHub
from controller.state.live import LiveState
from controller.state.reconcile import AdoptionLimits, reconcile
from controller.state.store import Store
from protocols import codec, messages, topics
from protocols.bus import Bus, BusSettings
from protocols.migration import MigrationSample
from protocols.rest import SchedulingHints
from protocols.vmspec import VmSpec
from tests.support.fleet import FAST_BUS, Fleet, eventually
from tests.support.samples import BOOT_ID, capabilities, vm_spec


def _inventory(host_id: str, *names: str, seq: int = 1, **caps: float) -> messages.HostInventory:
    return messages.HostInventory(
        host_id=host_id, boot_id=BOOT_ID, seq=seq, ts=time.time(), agent_version="t", address="127.0.0.1",
        capabilities=msgspec.structs.replace(capabilities(), **caps),
        vms=[messages.VmStatus(name=n, state="running", spec=vm_spec(n)) for n in names],
    )  # fmt: skip


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "c.sqlite")
    yield s
    s.close()


def _rogue(url: str, name: str = "rogue") -> Bus:
    return Bus(BusSettings(url=url, client_id=name, **FAST_BUS))  # type: ignore[arg-type]


# -- sequence numbers ----------------------------------------------------------------------------


def test_a_seq_jump_is_refused_and_does_not_move_the_run_forward():
    """Within one run a seq may grow by the step bound plus its rate over time; beyond, it is refused."""
    now = [100.0]
    guard = SequenceGuard(GuardSettings(max_seq_step=10, max_seq_rate=2.0), clock=lambda: now[0])
    first = _inventory("h1", seq=5)
    assert guard.problem(first) is None
    guard.accepted(first)
    huge = _inventory("h1", seq=10**12)
    why = guard.problem(huge)
    assert why is not None and "#1000000000000" in why and "#5" in why
    assert guard.problem(_inventory("h1", seq=15)) is None, "the refused jump left the bound at 5 + 10"
    now[0] += 10.0
    assert guard.problem(_inventory("h1", seq=35)) is None and guard.problem(_inventory("h1", seq=36))
    new_run = msgspec.structs.replace(huge, boot_id="another-boot")
    assert guard.problem(new_run) is None, "a new boot id starts a new run"
    ahead = msgspec.structs.replace(new_run, ts=time.time() + 3600)
    assert "ahead" in (guard.problem(ahead) or "")


async def test_a_forged_huge_seq_does_not_blind_the_controller_to_the_host(mosquitto, tmp_path):
    """An inventory with seq 10^12 and the host's boot id is refused; the host's real ones still count."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        ctl = fleet.ctl
        genuine = await eventually(lambda: ctl.live.inventories.get("h1"), 5, "h1's inventory")
        forged = msgspec.structs.replace(genuine, seq=10**12, ts=time.time(), vms=[])
        async with _rogue(mosquitto.url) as rogue:
            await rogue.wait_connected(5)
            await rogue.publish(topics.host_topic("h1", "inventory"), codec.encode(forged), qos=1)
            await eventually(lambda: ctl.intake.guards.by_reason["seq"] == 1, 5, "the forged seq refused")
        _, op, _ = ctl.vms.create(VmSpec(name="after", memory_mib=256))
        assert (await ctl.operations.wait(op.op_id, 10)).state == "succeeded"
        await eventually(
            lambda: any(vm.name == "after" for vm in ctl.live.inventories["h1"].vms), 5, "h1's next inventory"
        )
        assert ctl.live.inventories["h1"].seq < 10**6


# -- adoption ------------------------------------------------------------------------------------


def test_adoption_is_capped_per_round_and_the_rest_wait(store):
    """600 unknown VMs in one inventory: 256 adopted per round, the rest counted and left for later."""
    events = EventHub(store)
    names = [f"vm-{i}" for i in range(600)]
    limits = AdoptionLimits(per_round=256)
    done = reconcile(store, events, _inventory("h1", *names), limits)
    assert len(done.adopted) == 256 and done.deferred == 344
    assert len(store.vms("h1")) == 256
    done = reconcile(store, events, _inventory("h1", *names, seq=2), limits)
    assert len(done.adopted) == 256 and done.deferred == 88
    assert done.squatted == []


def test_a_host_cannot_take_a_name_another_host_holds(store):
    """h1 reporting h2's web-1 takes nothing: counted as squatting, and the record stays on h2."""
    events = EventHub(store)
    reconcile(store, events, _inventory("h2", "web-1"))
    done = reconcile(store, events, _inventory("h1", "web-1", "db-1"))
    assert done.squatted == ["web-1"] and done.adopted == ["db-1"]
    record = store.vm("web-1")
    assert record is not None and record.host_id == "h2"


def test_a_hostless_record_goes_only_to_the_host_its_create_targeted(store):
    """A create on h2 timed out (record in error, no host): h1 reporting the name cannot take it, h2 can."""
    events = EventHub(store)
    reconcile(store, events, _inventory("h2"))
    op = store.insert_operation(kind="create", vm="web-1", host_id="h2", params={}, deadline=time.time())
    store.insert_vm(vm_spec("web-1"), "h2", "creating", op.op_id)
    store.update_vm("web-1", state="error", host_id=None, op_id=None, error="timeout")
    store.finish_operation(op.op_id, "failed", "timeout: h2 did not answer")
    done = reconcile(store, events, _inventory("h1", "web-1"))
    assert done.squatted == ["web-1"] and done.adopted == []
    assert (r := store.vm("web-1")) is not None and r.host_id is None
    done = reconcile(store, events, _inventory("h2", "web-1", seq=2))
    assert done.adopted == ["web-1"]
    assert (r := store.vm("web-1")) is not None and r.host_id == "h2"


def test_squatting_many_names_records_few_events(store):
    """A host reporting 500 names held elsewhere adds a handful of events to the store, not 500."""
    events = EventHub(store)
    names = [f"vm-{i}" for i in range(500)]
    reconcile(store, events, _inventory("h2", *names), AdoptionLimits(per_round=1000))
    reconcile(store, events, _inventory("h1"))
    before = len(store.events_since(0, 10_000))
    done = reconcile(store, events, _inventory("h1", *names), AdoptionLimits(events_per_round=10))
    assert len(done.squatted) == 500
    assert len(store.events_since(0, 10_000)) - before <= 11


async def test_the_intake_adopts_a_large_inventory_over_several_rounds(mosquitto, tmp_path):
    """An inventory with 600 VMs is adopted 256 at a time, the later rounds coming by themselves."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        ctl = fleet.ctl
        inventory = _inventory("big", *(f"vm-{i}" for i in range(600)))
        async with _rogue(mosquitto.url, "big") as bus:
            await bus.wait_connected(5)
            await bus.publish(topics.host_topic("big", "inventory"), codec.encode(inventory), qos=1)
            await eventually(lambda: len(ctl.store.vms("big")) == 256, 5, "the first round")
            await eventually(lambda: len(ctl.store.vms("big")) == 600, 5, "the later rounds")


# -- bad numbers ---------------------------------------------------------------------------------


async def test_one_bad_power_model_does_not_stop_the_fleets_energy_count(store, caplog):
    """A host reporting idle above max is skipped, logged once; the other host is counted each sample."""
    events = EventHub(store)
    reconcile(store, events, _inventory("good"))
    reconcile(store, events, _inventory("bad", power_idle_w=500.0, power_max_w=100.0))
    live = LiveState()
    for host_id in ("good", "bad"):
        live.record_telemetry(
            messages.HostTelemetry(host_id=host_id, seq=1, ts=time.time(), cpu_util=0.5, memory_used_mib=0, power_w=1)
        )  # fmt: skip
    counter = EnergyCounter(store=store, live=live, drivers={}, settings=PowerSettings())
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        await counter.sample()
        await asyncio.sleep(0.01)
    assert counter.meter.host("good").samples == 3
    assert "bad" in counter.broken and "idle" in counter.broken["bad"]
    assert sum("host bad: its energy is not counted" in r.getMessage() for r in caplog.records) == 1
    assert counter.meter.kwh("good") > 0


def test_a_power_model_must_be_finite_and_plausible():
    """NaN or astronomic watts in a power model are refused with the rule, not counted as infinite kWh."""
    from controller.hardware import LinearPowerModel

    for idle, top in ((math.nan, 100.0), (10.0, math.inf), (10.0, 1e300)):
        with pytest.raises(ValueError, match="idle_w <= max_w"):
            LinearPowerModel(idle, top)
    meter = EnergyMeter()
    meter.record("h", 0.0, measured_w=1e300)
    assert meter.host("h").dropped == 1


async def test_telemetry_with_impossible_numbers_is_refused(mosquitto, tmp_path):
    """Telemetry with a NaN utilisation never reaches the live state the planner and energy read."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        ctl = fleet.ctl
        bad = messages.HostTelemetry(
            host_id="h9", seq=1, ts=time.time(), cpu_util=math.nan, memory_used_mib=0, power_w=-5.0
        )
        good = msgspec.structs.replace(bad, seq=2, cpu_util=0.5, power_w=120.0)
        async with _rogue(mosquitto.url, "h9") as bus:
            await bus.wait_connected(5)
            await bus.publish(topics.host_topic("h9", "inventory"), codec.encode(_inventory("h9")), qos=1)
            await eventually(lambda: ctl.store.host("h9"), 5, "h9 known")
            await bus.publish(topics.host_topic("h9", "telemetry"), codec.encode(bad), qos=1)
            guards, stats = ctl.intake.guards, ctl.intake.decoder.stats
            await eventually(
                lambda: guards.by_reason["telemetry"] + stats.by_host["h9"] == 1, 5, "the refusal"
            )  # by the guard, or by the wire bounds the decoder applies
            assert "h9" not in ctl.live.telemetry
            await bus.publish(topics.host_topic("h9", "telemetry"), codec.encode(good), qos=1)
            sample = await eventually(lambda: ctl.live.telemetry.get("h9"), 5, "the good sample")
            assert sample.cpu_util == 0.5


# -- events --------------------------------------------------------------------------------------


async def test_events_about_other_hosts_vms_are_refused(mosquitto, tmp_path):
    """h1 cannot report h2's VM as crashed, nor send progress for a migration it has no part in."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        await fleet.add_agent("h2")
        ctl = fleet.ctl
        _, op, _ = ctl.vms.create(VmSpec(name="web-1", memory_mib=256), hints=SchedulingHints(start_on="h2"))
        assert (await ctl.operations.wait(op.op_id, 10)).state == "succeeded"
        crash = messages.VmEvent(
            host_id="h1", seq=1, ts=time.time(), vm="web-1", event="crashed", state="crashed"
        )
        progress = messages.MigrationProgress(
            host_id="h1", seq=2, ts=time.time(), vm="web-1", op_id=op.op_id, stage="precopy",
            sample=MigrationSample(status="active"), downtime_limit_ms=300,
        )  # fmt: skip
        async with _rogue(mosquitto.url) as rogue:
            await rogue.wait_connected(5)
            for message in (crash, progress):
                await rogue.publish(topics.host_topic("h1", "events"), codec.encode(message), qos=1)
            await eventually(lambda: ctl.intake.guards.by_reason["event"] == 2, 5, "both refused")
        types = {e.type for e in ctl.store.events_since(0, 10_000)}
        assert "vm.crashed" not in types and "migration.progress" not in types
        assert (r := ctl.store.vm("web-1")) is not None and r.state == "running"


def test_events_are_limited_in_bytes_with_one_summary_line_per_interval(caplog):
    """Large events pass the message limit but not the byte limit; drops are summed in one line."""
    now = [0.0]
    limits = RateLimits(
        per_family={"events": (500.0, 2000.0)}, bytes_per_family={"events": (10_000.0, 50_000.0)}
    )
    limiter = InboundLimiter(limits, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "controller.intake.rate_limit")
    passed = sum(limiter.allow("h1", "events", 10_000) for _ in range(100))
    assert passed == 5 and limiter.dropped["h1"] == 95 and limiter.dropped_bytes["h1"] == 950_000
    assert limiter.allow("h2", "events", 10_000), "another host has its own buckets"
    now[0] += 1.0
    assert sum(limiter.allow("h1", "events", 10_000) for _ in range(10)) == 1
    assert not caplog.records, "no line per dropped event"
    now[0] += 5.0
    limiter.report()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "host h1 sent events over its limit" in line and "dropped 104 messages" in line


# -- retained news -------------------------------------------------------------------------------


async def test_retained_news_is_ignored_at_every_connect(mosquitto, tmp_path):
    """Retained telemetry, events and replies left on h1's topics are refused and counted, never applied:
    the telemetry would count as a heartbeat of a host that is gone.
    """
    telemetry = messages.HostTelemetry(
        host_id="h1", seq=1, ts=time.time(), cpu_util=0.1, memory_used_mib=0, power_w=1
    )
    event = messages.VmEvent(host_id="h1", seq=1, ts=time.time(), vm="x", event="crashed", state="crashed")
    reply = messages.Reply(op_id="op-1", host_id="h1", ok=True, ts=time.time())
    async with _rogue(mosquitto.url) as rogue:
        await rogue.wait_connected(5)
        for family, message in (("telemetry", telemetry), ("events", event), ("reply", reply)):
            await rogue.publish(topics.host_topic("h1", family), codec.encode(message), qos=1, retain=True)
        async with Fleet(mosquitto.url, tmp_path) as fleet:
            ctl = fleet.ctl
            await eventually(lambda: ctl.intake.guards.by_reason["retained"] == 3, 5, "3 retained refused")
            assert "h1" not in ctl.live.telemetry and "h1" not in ctl.ha.last_heartbeat
        for family in ("telemetry", "events", "reply"):
            await rogue.publish(topics.host_topic("h1", family), b"", qos=1, retain=True)
