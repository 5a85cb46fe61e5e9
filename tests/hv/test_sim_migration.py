"""The sim engine's live migration: handover, samples, agreement with the model, guard, restart, errors."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hv.driver import InsufficientResources, InvalidRequest, InvalidState, UnknownVm, VmExists
from hv.sim.clock import RealClock, VirtualClock
from hv.sim.driver import SimDriver
from hv.sim.migration import MigrationRun
from protocols.migration import (
    MIB,
    ConvergenceGuard,
    GuardAction,
    MigrationPolicy,
    MigrationSample,
    precopy_estimate,
)
from protocols.vmspec import VmSpec, VmWorkload

ENDED = ("completed", "cancelled", "failed")


def spec(name: str = "web", *, memory_mib: int = 1024, vcpus: int = 2, **workload: Any) -> VmSpec:
    return VmSpec(name=name, vcpus=vcpus, memory_mib=memory_mib, workload=VmWorkload(**workload))


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(start=1000.0)


@pytest.fixture
async def source(clock: VirtualClock) -> AsyncIterator[SimDriver]:
    async with SimDriver(host_id="src", memory_mib=16384, clock=clock) as drv:
        yield drv


@pytest.fixture
async def dest(clock: VirtualClock) -> AsyncIterator[SimDriver]:
    async with SimDriver(host_id="dst", memory_mib=16384, clock=clock) as drv:
        yield drv


async def running(drv: SimDriver, vm: VmSpec) -> None:
    await drv.define(vm)
    await drv.start(vm.name)


async def prepare(source: SimDriver, dest: SimDriver, vm: VmSpec) -> str:
    """A running VM on the source and its incoming copy on the destination; returns the URI."""
    await running(source, vm)
    _, uri = await dest.migrate_incoming(vm, "127.0.0.1")
    return uri


async def run_until_ended(
    drv: SimDriver, clock: VirtualClock, name: str, step_s: float = 0.1, limit_s: float = 600.0
) -> list[MigrationSample]:
    """Sample every ``step_s`` of clock time until the migration ends; every sample, in order."""
    samples = [await drv.migrate_sample(name)]
    deadline = clock.now() + limit_s
    while samples[-1].status not in ENDED:
        assert clock.now() < deadline, f"migration still {samples[-1].status} after {limit_s} s"
        await clock.advance(step_s)
        samples.append(await drv.migrate_sample(name))
    return samples


async def run_with_guard(
    drv: SimDriver, clock: VirtualClock, name: str, policy: MigrationPolicy, step_s: float = 0.2
) -> tuple[list[GuardAction], list[MigrationSample]]:
    """What the source agent does: feed samples to a ConvergenceGuard and carry out its actions."""
    guard = ConvergenceGuard(policy)
    actions: list[GuardAction] = []
    samples: list[MigrationSample] = []
    for _ in range(5000):
        sample = await drv.migrate_sample(name)
        samples.append(sample)
        if sample.status in ENDED:
            break
        action = guard.observe(sample, clock.now())
        if action.kind != "none":
            actions.append(action)
        if action.kind == "raise_downtime":
            await drv.migrate_tune(name, downtime_ms=action.downtime_ms)
        elif action.kind == "postcopy":
            await drv.migrate_postcopy(name)
        elif action.kind == "abort":
            await drv.migrate_cancel(name)
        await clock.advance(step_s)
    return actions, samples


# ------------------------------------------------------------------------------------------------
# The handover
# ------------------------------------------------------------------------------------------------


async def test_full_handover_from_source_to_destination(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """Incoming on the destination, send, completed, source paused as migrated, finish runs the copy."""
    vm = spec(memory_mib=2048, dirty_mib_s=20.0)
    await running(source, vm)
    status, uri = await dest.migrate_incoming(vm, "10.0.0.2")
    assert status.state == "incoming"
    assert uri == "sim://dst/web"
    assert [s.state for s in await dest.list()] == ["incoming"]

    await source.migrate_send("web", uri, MigrationPolicy())
    samples = await run_until_ended(source, clock, "web")
    assert samples[-1].status == "completed"
    [src_vm] = await source.list()
    assert (src_vm.state, src_vm.reason) == ("paused", "migrated to sim://dst/web")

    finished = await dest.migrate_finish("web")
    assert finished.state == "running"
    assert finished.started_at == clock.now()
    assert finished.spec == vm
    assert (await dest.migrate_finish("web")).state == "running", "finish must be idempotent"

    await source.destroy("web")
    await source.undefine("web")
    assert await source.list() == []
    assert [s.name for s in await dest.stats()] == ["web"]


async def test_samples_progress_from_setup_through_active_to_completed(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """Status goes setup, active, completed; bytes move forward; rounds count up; remaining ends at 0."""
    vm = spec(memory_mib=4096, dirty_mib_s=100.0)
    uri = await prepare(source, dest, vm)
    assert (await source.migrate_sample("web")).status == "none"
    await source.migrate_send("web", uri, MigrationPolicy(bandwidth_mib_s=512))
    samples = await run_until_ended(source, clock, "web", step_s=0.25)

    first, last = samples[0], samples[-1]
    assert first.status == "setup"
    assert first.remaining_bytes == first.total_bytes == 4096 * MIB
    assert first.bandwidth_bytes_s == 512 * MIB
    assert first.dirty_rate_bytes_s == 100 * MIB
    assert {s.status for s in samples[1:-1]} == {"active"}
    assert last.status == "completed"
    assert last.remaining_bytes == 0
    transferred = [s.transferred_bytes for s in samples]
    assert transferred == sorted(transferred) and transferred[-1] > 4096 * MIB
    iterations = [s.iteration for s in samples]
    assert iterations == sorted(iterations) and iterations[0] == 1 and iterations[-1] >= 3
    # Within round 0 the remainder falls at the link's rate; expected downtime follows it.
    mid = samples[4]
    assert mid.iteration == 1
    assert mid.remaining_bytes == 4096 * MIB - 512 * MIB
    assert mid.expected_downtime_ms == pytest.approx(3584 / 512 * 1000)


@pytest.mark.parametrize(
    ("memory_mib", "dirty_mib_s", "bandwidth_mib_s", "downtime_ms"),
    [(512, 4.0, 1024.0, 300), (4096, 300.0, 1024.0, 300), (2048, 40.0, 100.0, 100), (8192, 0.0, 800.0, 50)],
)
async def test_sim_agrees_with_precopy_estimate(
    source: SimDriver,
    dest: SimDriver,
    clock: VirtualClock,
    memory_mib: int,
    dirty_mib_s: float,
    bandwidth_mib_s: float,
    downtime_ms: int,
) -> None:
    """With no stall the sim's total time, downtime, rounds and bytes are precopy_estimate's."""
    est = precopy_estimate(memory_mib, dirty_mib_s, bandwidth_mib_s, downtime_ms)
    assert est.converges
    uri = await prepare(source, dest, spec(memory_mib=memory_mib, dirty_mib_s=dirty_mib_s))
    policy = MigrationPolicy(bandwidth_mib_s=bandwidth_mib_s, max_downtime_ms=downtime_ms)
    await source.migrate_send("web", uri, policy)
    done = (await run_until_ended(source, clock, "web", step_s=0.05))[-1]
    assert done.status == "completed"
    assert done.total_ms == pytest.approx(est.total_s * 1000, rel=0.01)
    assert done.downtime_ms == pytest.approx(est.downtime_ms, rel=0.01, abs=1e-6)
    assert done.iteration == est.rounds
    assert done.transferred_bytes == pytest.approx(est.transferred_mib * MIB, rel=0.01)
    assert done.throttle_pct == 0


async def test_the_host_link_caps_the_policy_bandwidth(clock: VirtualClock) -> None:
    """The effective bandwidth is the smaller of the policy's and the host's migration link."""
    async with (
        SimDriver(host_id="slow", migration_bandwidth_mib_s=100.0, clock=clock) as source,
        SimDriver(host_id="dst", clock=clock) as dest,
    ):
        uri = await prepare(source, dest, spec(memory_mib=1024, dirty_mib_s=10.0))
        await source.migrate_send("web", uri, MigrationPolicy(bandwidth_mib_s=1024))
        first = await source.migrate_sample("web")
        assert first.bandwidth_bytes_s == 100 * MIB
        done = (await run_until_ended(source, clock, "web"))[-1]
        est = precopy_estimate(1024, 10.0, 100.0, 300)
        assert done.total_ms == pytest.approx(est.total_s * 1000, rel=0.01)


def test_link_speed_must_be_positive() -> None:
    """A sim host refuses a migration link speed that is not a positive number."""
    with pytest.raises(ValueError, match="migration_bandwidth_mib_s must be a positive number"):
        SimDriver(host_id="h1", migration_bandwidth_mib_s=0.0)


async def test_a_real_clock_migration_completes_in_model_time() -> None:
    """On the wall clock a 128 MiB VM over the default 1170 MiB/s link completes in about 0.11 s."""
    async with (
        SimDriver(host_id="a", clock=RealClock()) as source,
        SimDriver(host_id="b", clock=RealClock()) as dest,
    ):
        uri = await prepare(source, dest, spec(memory_mib=128, dirty_mib_s=1.0))
        await source.migrate_send("web", uri, MigrationPolicy(bandwidth_mib_s=2000))
        sample = await source.migrate_sample("web")
        assert sample.status in ("setup", "active")
        clock = RealClock()
        began = clock.now()
        while (sample := await source.migrate_sample("web")).status != "completed":
            assert clock.now() - began < 5.0
            await clock.sleep(0.02)
        est = precopy_estimate(128, 1.0, 1170.0, 300)
        assert sample.total_ms == pytest.approx(est.total_s * 1000, rel=0.01)


# ------------------------------------------------------------------------------------------------
# Non-converging guests: auto-converge, the guard, post-copy
# ------------------------------------------------------------------------------------------------


async def test_auto_converge_makes_a_hot_vm_converge_and_the_throttle_rises(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """A guest dirtying faster than the link converges only with auto-converge, which throttles up."""
    hot = spec("hot", memory_mib=2048, dirty_mib_s=1500.0)
    cold = spec("cold", memory_mib=2048, dirty_mib_s=1500.0)
    uri_hot = await prepare(source, dest, hot)
    uri_cold = await prepare(source, dest, cold)
    await source.migrate_send("hot", uri_hot, MigrationPolicy(auto_converge=True))
    await source.migrate_send("cold", uri_cold, MigrationPolicy(auto_converge=False))

    samples = await run_until_ended(source, clock, "hot", step_s=0.5)
    assert samples[-1].status == "completed"
    throttles = [s.throttle_pct for s in samples]
    assert throttles == sorted(throttles), "the throttle never falls back"
    assert throttles[0] == 0 and 20 in throttles and throttles[-1] >= 40
    assert samples[-1].downtime_ms <= 300
    throttled = next(s for s in samples if s.throttle_pct >= 20 and s.status == "active")
    assert throttled.dirty_rate_bytes_s == pytest.approx(1500 * MIB * (1 - throttled.throttle_pct / 100))
    assert await dest.stats() == [], "incoming copies run no guest, so they are not sampled"

    await clock.advance(600.0)
    cold_sample = await source.migrate_sample("cold")
    assert cold_sample.status == "active", "without auto-converge it must never converge"
    assert cold_sample.throttle_pct == 0


async def test_auto_converge_throttles_the_guests_cpu_in_stats(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """While auto-converge throttles a guest its reported CPU use shrinks by the throttle."""
    uri = await prepare(source, dest, spec(memory_mib=2048, dirty_mib_s=1500.0, cpu_util=0.5))
    [before] = await source.stats()
    await source.migrate_send("web", uri, MigrationPolicy())
    await clock.advance(6.0)  # round 0 takes 2 s, round 1 another 2 s: then the throttle starts
    sample = await source.migrate_sample("web")
    assert sample.status == "active" and sample.throttle_pct >= 20
    [during] = await source.stats()
    assert during.cpu_util <= 0.5 * 1.1 * (1 - sample.throttle_pct / 100)
    assert during.cpu_util < before.cpu_util


async def test_guard_aborts_a_hot_vm_without_postcopy_and_cancel_leaves_it_running(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """No auto-converge and no post-copy: the guard raises the downtime, then aborts; the VM runs on."""
    uri = await prepare(source, dest, spec(memory_mib=4096, dirty_mib_s=2000.0))
    policy = MigrationPolicy(auto_converge=False, postcopy=False)
    await source.migrate_send("web", uri, policy)
    actions, samples = await run_with_guard(source, clock, "web", policy)

    assert [a.kind for a in actions] == ["raise_downtime", "abort"]
    assert actions[0].downtime_ms == policy.downtime_ceiling_ms
    assert "2000 MiB/s" in actions[1].reason and "1024 MiB/s" in actions[1].reason
    assert samples[-1].status == "cancelled"
    [vm] = await source.list()
    assert (vm.state, vm.reason) == ("running", "")
    # The controller's rollback on the destination: discard the copy.
    assert (await dest.destroy("web")).state == "stopped"
    await dest.undefine("web")
    assert await dest.list() == []


async def test_guard_switches_a_hot_vm_to_postcopy_and_it_completes(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """With post-copy allowed the guard switches to it, the guest leaves the source and it completes."""
    uri = await prepare(source, dest, spec(memory_mib=4096, dirty_mib_s=2000.0))
    policy = MigrationPolicy(auto_converge=False, postcopy=True)
    await source.migrate_send("web", uri, policy)
    actions, samples = await run_with_guard(source, clock, "web", policy)

    assert [a.kind for a in actions] == ["raise_downtime", "postcopy"]
    statuses = [s.status for s in samples]
    assert "postcopy-active" in statuses
    assert statuses[-1] == "completed"
    switched = statuses.index("postcopy-active")
    assert all(s == "postcopy-active" for s in statuses[switched:-1])
    assert samples[-1].downtime_ms <= policy.max_downtime_ms
    [vm] = await source.list()
    assert (vm.state, vm.reason) == ("paused", f"migrated to {uri}")


async def test_postcopy_cannot_be_cancelled_and_pauses_the_source_at_once(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """After the switch the source is paused as migrated and cancel is refused until it completes."""
    uri = await prepare(source, dest, spec(memory_mib=4096, dirty_mib_s=2000.0))
    await source.migrate_send("web", uri, MigrationPolicy(postcopy=True))
    await clock.advance(1.0)
    await source.migrate_postcopy("web")
    sample = await source.migrate_sample("web")
    assert sample.status == "postcopy-active"
    # 1 s of the first round sent 1024 MiB; 3072 MiB were still to go and 2000 MiB were dirtied.
    assert sample.remaining_bytes == 4096 * MIB
    [vm] = await source.list()
    assert (vm.state, vm.reason) == ("paused", f"migrated to {uri}")
    with pytest.raises(InvalidState, match="post-copy"):
        await source.migrate_cancel("web")
    with pytest.raises(InvalidState, match="post-copy"):
        await source.migrate_postcopy("web")
    await clock.advance(4.0)
    done = await source.migrate_sample("web")
    assert done.status == "completed"
    assert done.total_ms == pytest.approx(1000.0 + 4000.0)


async def test_postcopy_is_refused_unless_the_policy_allows_it(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """migrate_postcopy on a migration whose policy does not allow it is InvalidState; nothing changes."""
    uri = await prepare(source, dest, spec(memory_mib=4096, dirty_mib_s=2000.0))
    await source.migrate_send("web", uri, MigrationPolicy(postcopy=False))
    await clock.advance(1.0)
    with pytest.raises(InvalidState, match="does not allow post-copy"):
        await source.migrate_postcopy("web")
    assert (await source.migrate_sample("web")).status == "active"


async def test_raising_the_downtime_converges_at_the_next_round_end(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """migrate_tune takes effect at the end of the round under way, as QEMU's downtime-limit does."""
    uri = await prepare(source, dest, spec(memory_mib=1024, dirty_mib_s=2000.0))
    await source.migrate_send("web", uri, MigrationPolicy(auto_converge=False))
    await clock.advance(2.5)  # every round sends 1024 MiB in 1 s: round 2 is under way
    assert (await source.migrate_sample("web")).iteration == 3
    await source.migrate_tune("web", downtime_ms=1500)
    await clock.advance(0.49)
    assert (await source.migrate_sample("web")).status == "active"
    await clock.advance(1.02)  # round 2 ends at 3.0 s, then 1 s of stop-and-copy
    done = await source.migrate_sample("web")
    assert done.status == "completed"
    assert done.downtime_ms == pytest.approx(1000.0)
    assert done.total_ms == pytest.approx(4000.0)


async def test_tune_refuses_a_downtime_below_one_ms(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """migrate_tune(downtime_ms=0) is InvalidRequest."""
    uri = await prepare(source, dest, spec())
    await source.migrate_send("web", uri, MigrationPolicy())
    with pytest.raises(InvalidRequest, match="downtime_ms must be at least 1"):
        await source.migrate_tune("web", downtime_ms=0)


async def test_a_workload_change_mid_migration_changes_the_dirty_rate(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """set_workload during a migration applies from then on: a guest that calms down converges."""
    uri = await prepare(source, dest, spec(memory_mib=1024, dirty_mib_s=2000.0))
    await source.migrate_send("web", uri, MigrationPolicy(auto_converge=False))
    await clock.advance(3.5)
    assert (await source.migrate_sample("web")).dirty_rate_bytes_s == 2000 * MIB
    source.set_workload("web", dirty_mib_s=0.0)
    assert (await source.migrate_sample("web")).dirty_rate_bytes_s == 0
    # Round 3 (3 s..4 s) dirtied 1000 MiB before the change and nothing after: too much for 300 ms.
    # Round 4 sends those 1000 MiB and dirties nothing: it converges with no downtime.
    done = (await run_until_ended(source, clock, "web", step_s=0.1))[-1]
    assert done.status == "completed"
    assert done.iteration == 5
    assert done.downtime_ms == 0.0


# ------------------------------------------------------------------------------------------------
# Cancel, attach, failure
# ------------------------------------------------------------------------------------------------


async def test_cancel_stops_the_migration_keeps_the_vm_running_and_allows_a_retry(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """migrate_cancel mid-run: cancelled, nothing moves any more, the VM runs; a new send starts afresh."""
    uri = await prepare(source, dest, spec(memory_mib=4096, dirty_mib_s=10.0))
    await source.migrate_send("web", uri, MigrationPolicy())
    await clock.advance(1.0)
    status = await source.migrate_cancel("web")
    assert status.state == "running"
    cancelled = await source.migrate_sample("web")
    assert cancelled.status == "cancelled"
    assert cancelled.transferred_bytes == 1024 * MIB
    await clock.advance(10.0)
    assert await source.migrate_sample("web") == cancelled
    assert (await source.migrate_cancel("web")).state == "running", "cancel twice is harmless"

    await source.migrate_send("web", uri, MigrationPolicy())
    retry = await source.migrate_sample("web")
    assert (retry.status, retry.transferred_bytes) == ("setup", 0)


async def test_cancel_without_a_migration_just_returns_the_status(source: SimDriver) -> None:
    """migrate_cancel on a VM that never migrated changes nothing and returns its status."""
    await running(source, spec())
    status = await source.migrate_cancel("web")
    assert status.state == "running"


async def test_cancel_after_completion_is_refused(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """A completed migration cannot be cancelled: the guest runs on the destination; the source stays paused."""
    uri = await prepare(source, dest, spec(memory_mib=512))
    await source.migrate_send("web", uri, MigrationPolicy())
    await run_until_ended(source, clock, "web")
    with pytest.raises(InvalidState, match="completed"):
        await source.migrate_cancel("web")
    [vm] = await source.list()
    assert vm.state == "paused"


async def test_send_again_attaches_to_the_migration_under_way(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """A repeated migrate_send to the same URI changes nothing; another URI is refused while one runs."""
    uri = await prepare(source, dest, spec(memory_mib=4096))
    await source.migrate_send("web", uri, MigrationPolicy())
    await clock.advance(1.5)
    before = await source.migrate_sample("web")
    await source.migrate_send("web", uri, MigrationPolicy(bandwidth_mib_s=10))
    assert await source.migrate_sample("web") == before
    with pytest.raises(InvalidState, match="already migrating to sim://dst/web"):
        await source.migrate_send("web", "sim://other/web", MigrationPolicy())
    await run_until_ended(source, clock, "web")
    await source.migrate_send("web", uri, MigrationPolicy())  # completed: still attaches
    assert (await source.migrate_sample("web")).status == "completed"
    with pytest.raises(InvalidState, match="is paused"):
        await source.migrate_send("web", "sim://other/web", MigrationPolicy())
    await source.resume("web")  # by hand, after the handover: it may migrate anew
    await source.migrate_send("web", "sim://other/web", MigrationPolicy())
    assert (await source.migrate_sample("web")).status == "setup"


async def test_powering_the_source_off_fails_its_migration(
    source: SimDriver, dest: SimDriver, clock: VirtualClock
) -> None:
    """Destroying the source mid-migration ends the migration as failed, with the reason."""
    uri = await prepare(source, dest, spec(memory_mib=4096))
    await source.migrate_send("web", uri, MigrationPolicy())
    await clock.advance(1.0)
    await source.destroy("web")
    sample = await source.migrate_sample("web")
    assert sample.status == "failed"
    assert "stopped" in sample.error
    assert (await source.migrate_cancel("web")).state == "stopped"


# ------------------------------------------------------------------------------------------------
# Restart
# ------------------------------------------------------------------------------------------------


async def test_a_migration_survives_a_new_driver_on_the_same_state_dir(
    tmp_path: pathlib.Path, clock: VirtualClock
) -> None:
    """An agent restart mid-migration: the new driver reports the same progress and completes it."""
    vm = spec(memory_mib=4096, dirty_mib_s=300.0)
    policy = MigrationPolicy(max_downtime_ms=200)
    async with SimDriver(host_id="dst", clock=clock) as dest:
        first = SimDriver(host_id="src", state_dir=tmp_path / "src", clock=clock)
        async with first:
            uri = await prepare(first, dest, vm)
            await first.migrate_send("web", uri, policy)
            await clock.advance(4.5)
            await first.migrate_tune("web", downtime_ms=250)
            before = await first.migrate_sample("web")
        assert before.status == "active" and before.iteration == 2

        async with SimDriver(host_id="src", state_dir=tmp_path / "src", clock=clock) as second:
            assert await second.migrate_sample("web") == before
            await clock.advance(0.3)
            later = await second.migrate_sample("web")
            assert later.transferred_bytes > before.transferred_bytes
            done = (await run_until_ended(second, clock, "web"))[-1]
            [src_vm] = await second.list()

    est = precopy_estimate(4096, 300.0, 1024.0, 250)
    assert done.status == "completed"
    assert done.total_ms == pytest.approx(est.total_s * 1000, rel=0.01)
    assert done.downtime_ms == pytest.approx(est.downtime_ms, rel=0.01)
    assert (src_vm.state, src_vm.reason) == ("paused", f"migrated to {uri}")


async def test_a_long_stall_replays_quickly_and_the_same_however_it_was_sampled(
    tmp_path: pathlib.Path, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A day of a stalled migration (1.4 million rounds) costs little; a restart reports it identically."""
    # "Costs little" is counted, not timed: identical rounds are jumped over in one step, so only a
    # handful of rounds are replayed one by one, however slow the machine.
    replayed = 0
    end_round = MigrationRun._end_round

    def counting_end_round(run: MigrationRun, at: float) -> None:
        nonlocal replayed
        replayed += 1
        end_round(run, at)

    monkeypatch.setattr(MigrationRun, "_end_round", counting_end_round)
    async with SimDriver(host_id="src", state_dir=tmp_path, clock=clock) as first:
        await running(first, spec(memory_mib=64, dirty_mib_s=100_000.0))
        await first.migrate_send(
            "web", "sim://dst/web", MigrationPolicy(auto_converge=False, max_downtime_ms=1)
        )
        for step in range(1, 48):
            await clock.advance(1800.0 + (step % 7) * 0.013)
            await first.migrate_sample("web")
        first.set_workload("web", dirty_mib_s=50_000.0)
        await clock.advance(61.7)
        seen = await first.migrate_sample("web")
    async with SimDriver(host_id="src", state_dir=tmp_path, clock=clock) as second:
        assert await second.migrate_sample("web") == seen
    assert seen.status == "active"
    assert seen.iteration > 1_350_000
    assert replayed < 1_000, f"{replayed} rounds replayed one by one for {seen.iteration} rounds"


async def test_an_incoming_copy_survives_a_restart(tmp_path: pathlib.Path, clock: VirtualClock) -> None:
    """The destination's incoming copy is persisted; after a restart migrate_incoming is idempotent."""
    async with SimDriver(host_id="dst", state_dir=tmp_path, clock=clock) as dest:
        _, uri = await dest.migrate_incoming(spec(), "0.0.0.0")
    async with SimDriver(host_id="dst", state_dir=tmp_path, clock=clock) as dest:
        [vm] = await dest.list()
        assert vm.state == "incoming"
        assert (await dest.migrate_incoming(spec(), "0.0.0.0"))[1] == uri
        assert len(await dest.list()) == 1
        assert (await dest.migrate_finish("web")).state == "running"


# ------------------------------------------------------------------------------------------------
# Incoming copies and bad input
# ------------------------------------------------------------------------------------------------


async def test_incoming_copy_holds_memory_but_no_cpu(dest: SimDriver) -> None:
    """An incoming copy counts memory on the host, is listed, uses no CPU and is not sampled."""
    await dest.migrate_incoming(spec(memory_mib=4096, cpu_util=1.0, vcpus=8), "0.0.0.0")
    host = dest.host_sample()
    assert host.memory_used_mib == 4096
    assert host.cpu_util == 0.0
    assert host.power_w == dest.power_idle_w
    assert await dest.stats() == []
    assert [(s.name, s.state) for s in await dest.list()] == [("web", "incoming")]


async def test_incoming_copy_refuses_lifecycle_calls_but_can_be_discarded(dest: SimDriver) -> None:
    """start, pause and shutdown of an incoming copy are InvalidState; destroy stops it; undefine works."""
    await dest.migrate_incoming(spec(), "0.0.0.0")
    for call in (dest.start("web"), dest.pause("web"), dest.shutdown("web", 1.0)):
        with pytest.raises(InvalidState, match="incoming"):
            await call
    await dest.undefine("web")
    assert await dest.list() == []
    await dest.migrate_incoming(spec(), "0.0.0.0")
    assert (await dest.destroy("web")).state == "stopped"
    with pytest.raises(InvalidState, match="not an incoming migration copy"):
        await dest.migrate_finish("web")


async def test_incoming_over_capacity_is_refused(dest: SimDriver) -> None:
    """An incoming copy that does not fit the host's free memory is InsufficientResources; nothing is kept."""
    await dest.define(spec("big", memory_mib=12288))
    with pytest.raises(InsufficientResources, match="4096 MiB free"):
        await dest.migrate_incoming(spec(memory_mib=8192), "0.0.0.0")
    assert [s.name for s in await dest.list()] == ["big"]


async def test_incoming_counts_against_later_defines(dest: SimDriver) -> None:
    """Memory held by an incoming copy is not free for a new VM."""
    await dest.migrate_incoming(spec(memory_mib=12288), "0.0.0.0")
    with pytest.raises(InsufficientResources):
        await dest.define(spec("other", memory_mib=8192))


async def test_incoming_over_an_ordinary_vm_is_vm_exists(dest: SimDriver) -> None:
    """migrate_incoming for a name that is defined here and not incoming is VmExists."""
    await dest.define(spec())
    with pytest.raises(VmExists, match="cannot be migrated here"):
        await dest.migrate_incoming(spec(), "0.0.0.0")


async def test_incoming_is_idempotent(dest: SimDriver) -> None:
    """A second migrate_incoming for a waiting copy returns the same URI and reserves nothing more."""
    first = await dest.migrate_incoming(spec(memory_mib=2048), "0.0.0.0")
    second = await dest.migrate_incoming(spec(memory_mib=2048), "0.0.0.0")
    assert first == second
    assert dest.host_sample().memory_used_mib == 2048


async def test_send_of_an_unknown_or_stopped_vm_is_refused(source: SimDriver) -> None:
    """migrate_send of an unknown VM is UnknownVm, of a stopped one InvalidState; no migration starts."""
    with pytest.raises(UnknownVm):
        await source.migrate_send("ghost", "sim://dst/ghost", MigrationPolicy())
    await source.define(spec())
    with pytest.raises(InvalidState, match="is defined"):
        await source.migrate_send("web", "sim://dst/web", MigrationPolicy())
    assert (await source.migrate_sample("web")).status == "none"
    with pytest.raises(UnknownVm):
        await source.migrate_sample("ghost")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("tcp:10.0.0.2:4444", "not a sim migration URI"),
        ("sim://dst/other", "not a sim migration URI"),
        ("sim://src/web", "is this host"),
    ],
)
async def test_send_to_a_bad_uri_is_refused(source: SimDriver, uri: str, message: str) -> None:
    """A URI that is not another sim host's for this VM is InvalidRequest; the VM keeps running."""
    await running(source, spec())
    with pytest.raises(InvalidRequest, match=message):
        await source.migrate_send("web", uri, MigrationPolicy())
    assert (await source.migrate_sample("web")).status == "none"
    assert (await source.list())[0].state == "running"


async def test_send_with_an_invalid_policy_is_refused(source: SimDriver) -> None:
    """A policy that check_policy rejects is InvalidRequest naming the problem."""
    await running(source, spec())
    with pytest.raises(InvalidRequest, match="downtime_ceiling_ms"):
        await source.migrate_send(
            "web", "sim://dst/web", MigrationPolicy(max_downtime_ms=500, downtime_ceiling_ms=100)
        )
    assert (await source.migrate_sample("web")).status == "none"


async def test_tune_and_postcopy_need_a_migration(source: SimDriver) -> None:
    """migrate_tune and migrate_postcopy with no migration under way are InvalidState."""
    await running(source, spec())
    with pytest.raises(InvalidState, match="no migration"):
        await source.migrate_tune("web", downtime_ms=500)
    with pytest.raises(InvalidState, match="no migration"):
        await source.migrate_postcopy("web")


async def test_finish_of_an_unknown_or_stopped_vm_is_refused(dest: SimDriver) -> None:
    """migrate_finish of an unknown VM is UnknownVm, of a stopped one InvalidState."""
    with pytest.raises(UnknownVm):
        await dest.migrate_finish("ghost")
    await dest.define(spec())
    with pytest.raises(InvalidState, match="is defined, not an incoming"):
        await dest.migrate_finish("web")
    assert (await dest.list())[0].state == "defined"
