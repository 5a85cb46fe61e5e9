"""The per-host agent: it owns one hypervisor driver and speaks for its host on the bus.

What it does, and where:
- On every (re)connect it publishes a retained ``online`` state (its Last Will publishes the
  ``offline`` one) and its full inventory, so the controller can reconcile.
- It samples telemetry on an interval (QoS 0, dropped while the broker is away).
- It applies commands idempotently: each operation id is applied once (see :mod:`agent.ledger`),
  commands for one VM run in order, commands for different VMs run in parallel.
- It reports what the engine notices on its own (a guest that powered off, a crash) as events.
- It never stops its VMs because the controller or the broker went away; leaving the agent does not
  stop them either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from agent.fencing import SelfFence
from agent.ledger import OpLedger
from agent.migration import MigrationRunner
from agent.settings import AgentSettings
from hv.driver import Driver, DriverEvent, HvError, MigrationCompleted, UnknownVm
from protocols import codec, topics
from protocols.bus import Bus, BusSettings, LastWill
from protocols.messages import (
    AbortMigration,
    AgentRefused,
    CancelMigration,
    Capabilities,
    Command,
    DefineVm,
    DestroyVm,
    ErrorCode,
    FinishMigration,
    HostInventory,
    HostState,
    HostTelemetry,
    MigrateVm,
    MigrationProgress,
    PauseVm,
    PrepareMigration,
    RebootVm,
    RefreshInventory,
    Reply,
    ResumeVm,
    ShutdownVm,
    StartVm,
    UndefineVm,
    VmEvent,
    VmEventKind,
    VmStatus,
    VmTelemetry,
)
from protocols.migration import MigrationResult, MigrationSample, MigrationStage
from protocols.tasks import cancel_and_wait
from protocols.text import printable

__all__ = ["AGENT_VERSION", "Agent", "AgentSettings"]

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"


@dataclass(slots=True)
class _VmLane:
    """One VM's ordered command queue and the task draining it."""

    queue: asyncio.Queue[Command]
    task: asyncio.Task[None]


class Agent:
    """One host's agent. ``async with Agent(settings, driver) as agent: await agent.stopped.wait()``."""

    def __init__(self, settings: AgentSettings, driver: Driver) -> None:
        self.settings = settings
        self.driver = driver
        self.host_id = settings.host_id
        self.boot_id = uuid.uuid4().hex
        self.decoder = codec.InboundDecoder()
        self.stopped = asyncio.Event()
        self._caps: Capabilities | None = None
        self._lanes: dict[str, _VmLane] = {}
        self._inflight: dict[str, asyncio.Future[Reply]] = {}
        self._event_seq = 0
        #: Outgoing migrations under way, by VM: where a CancelMigration finds its runner.
        self._migrations: dict[str, MigrationRunner] = {}
        self._inventory_seq = 0
        self._telemetry_seq = 0
        self._inventory_dirty = asyncio.Event()
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=10_000)
        self._tasks: list[asyncio.Task[None]] = []
        self.ledger: OpLedger | None = None
        #: Why the controller refused this run (another live agent has the host id), once it has.
        self.refused: str | None = None
        self._stopping = False
        self.fencing = SelfFence(
            self.host_id,
            driver,
            lambda vm, state, reason: self._queue_event(vm, "stopped", state, reason, op_id=""),
            settings.state_dir,
        )
        self._leaving: asyncio.Future[None] | None = None
        offline = HostState(
            host_id=self.host_id, online=False, boot_id=self.boot_id, ts=0.0, reason="connection lost"
        )
        self.bus = Bus(
            BusSettings(
                url=settings.broker_url,
                client_id=f"fv-agent-{self.host_id}",
                username=settings.username,
                password=settings.password,
                **settings.bus_overrides,
            ),
            will=LastWill(
                topics.host_topic(self.host_id, "state"), codec.encode(offline), qos=1, retain=True
            ),
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        state_dir = self.settings.state_dir
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ledger = OpLedger(state_dir / "ops.sqlite" if state_dir else None)
        self.driver.set_event_sink(self._on_driver_event)
        await self.driver.open()
        self._caps = await self.driver.capabilities()
        await self.fencing.honour_marker()
        self._write_pid()
        self.bus.subscribe(topics.host_topic(self.host_id, "cmd"), self._on_command, qos=1)
        self.bus.on_connect(self._announce)
        await self.bus.__aenter__()
        self._spawn(self._telemetry_loop(), "telemetry")
        self._spawn(self._inventory_loop(), "inventory")
        self._spawn(self._outbox_loop(), "outbox")
        if self.settings.ha_lease_s is not None:
            self._spawn(self.fencing.lease_loop(self.bus, self.settings.ha_lease_s), "ha-lease")
        log.info(
            "agent %s: %s engine, %d cores, %d MiB; broker %s",
            self.host_id,
            self._caps.engine,
            self._caps.cores,
            self._caps.memory_mib,
            self.settings.broker_url,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    async def shutdown(self, *, announce: bool = True) -> None:
        """Leave the bus cleanly (offline state unless not ``announce``, no Last Will) and detach; VMs
        keep running.
        """
        if self._stopping:
            await self.stopped.wait()
            return
        self._stopping = True
        if announce and self.bus.connected.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._publish_state(online=False, reason="agent stopped"), 2.0)
        tasks = self._tasks + [lane.task for lane in self._lanes.values()]
        await cancel_and_wait(tasks)  # cancelled again if one swallows it (see protocols.tasks)
        self._tasks.clear()
        self._lanes.clear()
        await self.bus.close()
        await self.driver.close()
        if self.settings.state_dir is not None:
            (self.settings.state_dir / "agent.pid").unlink(missing_ok=True)
        if self.ledger is not None:
            self.ledger.close()
        self.stopped.set()

    def _on_refused(self, message: AgentRefused) -> None:
        """The controller refuses an agent run of this host id: stop, if it is this one."""
        if message.boot_id != self.boot_id or self._stopping:
            return  # the other run's refusal (both share the host's command topic)
        self.refused = (
            f"refused by the controller: another agent with host id {self.host_id!r} is live (run "
            f"{message.kept_boot_id[:8]}) and was there first, so this one (run {self.boot_id[:8]}) "
            f"stops. {printable(message.reason)} Stop one of the two, or give this one its own --host-id"
        )
        log.error("agent %s: %s", self.host_id, self.refused)
        # Not an offline state: the host is online, through the other agent.
        self._leaving = asyncio.ensure_future(self.shutdown(announce=False))

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(self._guard(coro, name))
        self._tasks.append(task)

    async def _guard(self, coro: Awaitable[None], name: str) -> None:
        """Run a long-lived task; log a crash or an unexpected return instead of losing it silently."""
        try:
            await coro
            log.error("agent %s: task %s returned unexpectedly", self.host_id, name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent %s: task %s crashed", self.host_id, name)

    def _write_pid(self) -> None:
        """agent.pid in the state directory: how a process fence finds this agent."""
        if self.settings.state_dir is not None:
            (self.settings.state_dir / "agent.pid").write_text(f"{os.getpid()}\n")

    async def self_fence(self, reason: str) -> list[str]:
        """Destroy every running HA VM (see :mod:`agent.fencing`). Returns their names."""
        return await self.fencing.fence(reason)

    # -- announcing -----------------------------------------------------------------------------

    async def _announce(self, first: bool) -> None:
        await self._publish_state(online=True, reason="agent started" if first else "reconnected")
        await self._publish_inventory("hello" if first else "reconnect")

    async def _publish_state(self, *, online: bool, reason: str) -> None:
        state = HostState(
            host_id=self.host_id, online=online, boot_id=self.boot_id, ts=time.time(), reason=reason
        )
        await self.bus.publish(
            topics.host_topic(self.host_id, "state"), codec.encode(state), qos=1, retain=True
        )

    async def inventory(self, reason: str = "refresh") -> HostInventory:
        assert self._caps is not None
        self._inventory_seq += 1
        return HostInventory(
            host_id=self.host_id,
            boot_id=self.boot_id,
            seq=self._inventory_seq,
            ts=time.time(),
            agent_version=AGENT_VERSION,
            address=self.settings.address,
            capabilities=self._caps,
            vms=await self.driver.list(),
            reason=reason,  # type: ignore[arg-type]
            labels=dict(self.settings.labels),
            join_token=self.settings.join_token,
        )

    async def _publish_inventory(self, reason: str) -> None:
        self._inventory_dirty.clear()
        inventory = await self.inventory(reason)
        await self.bus.publish(
            topics.host_topic(self.host_id, "inventory"), codec.encode(inventory), qos=1, retain=True
        )

    async def _inventory_loop(self) -> None:
        while True:
            await self._inventory_dirty.wait()
            await asyncio.sleep(self.settings.inventory_debounce_s)
            await self._publish_inventory("change")

    # -- telemetry ------------------------------------------------------------------------------

    async def telemetry_sample(self) -> HostTelemetry:
        """One telemetry message: host load from the VMs' load, power from the host's power model."""
        assert self._caps is not None
        caps = self._caps
        stats = await self.driver.stats()
        vcpus = {vm.name: vm.spec.vcpus for vm in await self.driver.list()}
        busy_cores = sum(s.cpu_util * vcpus.get(s.name, 1) for s in stats)
        cpu_util = min(1.0, busy_cores / caps.cores) if caps.cores else 0.0
        self._telemetry_seq += 1
        return HostTelemetry(
            host_id=self.host_id,
            seq=self._telemetry_seq,
            ts=time.time(),
            cpu_util=cpu_util,
            memory_used_mib=sum(s.memory_mib for s in stats),
            power_w=caps.power_idle_w + (caps.power_max_w - caps.power_idle_w) * cpu_util,
            vms=[
                VmTelemetry(
                    name=s.name, cpu_util=s.cpu_util, dirty_mib_s=s.dirty_mib_s, memory_mib=s.memory_mib
                )
                for s in stats
            ],
        )

    async def _telemetry_loop(self) -> None:
        topic = topics.host_topic(self.host_id, "telemetry")
        interval = self.settings.telemetry_interval_s
        next_at = time.monotonic()
        while True:
            if self.bus.connected.is_set():
                self.bus.publish_nowait(topic, codec.encode(await self.telemetry_sample()))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > interval:  # we fell behind (suspend, overload): do not burst
                next_at = time.monotonic()

    # -- events ---------------------------------------------------------------------------------

    def _on_driver_event(self, event: DriverEvent) -> None:
        self._queue_event(event.vm, event.event, event.state, event.reason, op_id="")

    def _queue_event(self, vm: str, kind: VmEventKind, state: Any, reason: str, op_id: str) -> None:
        self._event_seq += 1
        message = VmEvent(
            host_id=self.host_id,
            seq=self._event_seq,
            ts=time.time(),
            vm=vm,
            event=kind,
            state=state,
            reason=reason,
            op_id=op_id,
        )
        self._enqueue(topics.host_topic(self.host_id, "events"), codec.encode(message))
        self._inventory_dirty.set()

    def _enqueue(self, topic: str, payload: bytes) -> None:
        try:
            self._outbox.put_nowait((topic, payload))
        except asyncio.QueueFull:
            log.error("agent %s: outbox full, dropped a message for %s", self.host_id, topic)

    async def _outbox_loop(self) -> None:
        """QoS 1 messages (events, replies) leave in order; the bus buffers them while offline."""
        while True:
            topic, payload = await self._outbox.get()
            await self.bus.publish(topic, payload, qos=1)

    # -- commands -------------------------------------------------------------------------------

    def _on_command(self, topic: str, payload: bytes) -> None:
        command = self.decoder.decode(topic, payload)
        if command is None:
            return  # counted and logged by the decoder
        if isinstance(command, AgentRefused):
            self._on_refused(command)
            return
        self.submit(command)  # type: ignore[arg-type]  # the cmd family decodes only to CmdMessage

    def submit(self, command: Command) -> None:
        """Accept a command: replay its reply if already applied, else queue it on its VM's lane."""
        assert self.ledger is not None
        done = self.ledger.get(command.op_id)
        if done is not None:
            log.info("agent %s: op %s already applied; sending its reply again", self.host_id, command.op_id)
            self._send_reply(done)
            return
        pending = self._inflight.get(command.op_id)
        if pending is not None:
            log.info("agent %s: op %s is in progress; both copies get its reply", self.host_id, command.op_id)
            pending.add_done_callback(lambda f: self._send_reply(f.result()) if not f.cancelled() else None)
            return
        if command.deadline and time.time() > command.deadline:
            self._finish(command, ok=False, code="expired", error=_expired_message(command))
            return
        if isinstance(command, CancelMigration):
            self._cancel_migration(command)  # not queued: the VM's lane is busy with the migration
            return
        key = (
            command.spec.name
            if isinstance(command, DefineVm | PrepareMigration)
            else getattr(command, "vm", "")
        )
        lane = self._lanes.get(key)
        if lane is None or lane.task.done():
            queue: asyncio.Queue[Command] = asyncio.Queue(maxsize=self.settings.max_queued_per_vm)
            lane = _VmLane(queue, asyncio.ensure_future(self._lane_loop(key, queue)))
            self._lanes[key] = lane
        try:
            lane.queue.put_nowait(command)
        except asyncio.QueueFull:
            self._finish(
                command,
                ok=False,
                code="invalid_request",
                error=f"vm {key!r} has {lane.queue.qsize()} commands waiting on host {self.host_id!r}; "
                "retry when they are done",
            )
            return
        self._inflight[command.op_id] = asyncio.get_running_loop().create_future()

    async def _lane_loop(self, key: str, queue: asyncio.Queue[Command]) -> None:
        """Apply one VM's commands in arrival order; exit after a quiet minute."""
        while True:
            try:
                async with asyncio.timeout(60.0):  # not wait_for, which can swallow a cancel (3.11)
                    command = await queue.get()
            except TimeoutError:
                if self._lanes.get(key) is not None and self._lanes[key].queue is queue and queue.empty():
                    del self._lanes[key]
                return
            try:
                await self._apply(command)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an engine bug must not kill the lane
                log.exception("agent %s: op %s failed unexpectedly", self.host_id, command.op_id)
                self._finish(command, ok=False, code="engine_error", error=f"{type(exc).__name__}: {exc}")

    async def _apply(self, command: Command) -> None:
        if command.deadline and time.time() > command.deadline:
            self._finish(command, ok=False, code="expired", error=_expired_message(command))
            return
        try:
            if isinstance(command, MigrateVm):
                await self._migrate(command)
                return
            if isinstance(command, PrepareMigration):
                incoming, uri = await self.driver.migrate_incoming(
                    command.spec, self.settings.address, policy=command.policy
                )
                log.info("agent %s: vm %s waits for its stream from %s at %s", self.host_id,
                         command.spec.name, command.source_host, uri)  # fmt: skip
                self._inventory_dirty.set()
                self._finish(command, ok=True, vm=incoming, uri=uri)
                return
            status, event = await self._run(command)
        except HvError as exc:
            self._finish(command, ok=False, code=exc.code, error=str(exc))
            return
        if event is not None and status is not None:
            self._queue_event(status.name, event, status.state, "", command.op_id)
        elif event is not None:
            self._queue_event(getattr(command, "vm", ""), event, "stopped", "", command.op_id)
        self._finish(command, ok=True, vm=status)

    async def _run(self, command: Command) -> tuple[VmStatus | None, VmEventKind | None]:
        d = self.driver
        if isinstance(command, FinishMigration | AbortMigration):
            return await self._settle_migration(command)
        match command:
            case DefineVm(spec=spec, start=start):
                status = await d.define(spec)
                if start:
                    return await d.start(spec.name), "started"
                return status, "defined"
            case StartVm(vm=vm):
                return await d.start(vm), "started"
            case ShutdownVm(vm=vm, timeout_s=timeout_s):
                return await d.shutdown(vm, timeout_s), "shutdown"
            case DestroyVm(vm=vm):
                return await d.destroy(vm), "stopped"
            case PauseVm(vm=vm):
                return await d.pause(vm), "paused"
            case ResumeVm(vm=vm):
                return await d.resume(vm), "resumed"
            case RebootVm(vm=vm):
                return await d.reboot(vm), "rebooted"
            case UndefineVm(vm=vm):
                await self._remove(vm)
                return None, "undefined"
            case RefreshInventory():
                await self._publish_inventory("refresh")
                return None, None
        raise AssertionError(f"unhandled command {command!r}")

    async def _settle_migration(
        self, command: FinishMigration | AbortMigration
    ) -> tuple[VmStatus | None, VmEventKind | None]:
        """A migration's destination: run the copy that arrived, or discard it."""
        if isinstance(command, FinishMigration):
            return await self.driver.migrate_finish(command.vm), "started"
        try:
            received = await self.driver.migrate_received(command.vm)
        except UnknownVm:
            received = False
        if received:
            # The source may have reported a failure it could not see the end of (its QEMU died after
            # the last byte went out): this copy is then the only whole guest, and it is kept.
            raise MigrationCompleted(
                f"the incoming copy of vm {command.vm!r} on host {self.host_id!r} holds the whole guest "
                "(its stream completed), so it is kept: finish the migration here instead of rolling it back"
            )
        # Nothing came, or it is cleaned up already: then there is nothing to undefine.
        return (None, "undefined") if await self._remove(command.vm, missing_ok=True) else (None, None)

    async def _remove(self, vm: str, *, missing_ok: bool = False) -> bool:
        """Power ``vm`` off if it runs, then undefine it. Returns False if it was not there (``missing_ok``)."""
        current = {s.name: s for s in await self.driver.list()}.get(vm)
        if current is None and missing_ok:
            return False
        if current is not None and current.state not in ("stopped", "defined", "crashed"):
            await self.driver.destroy(vm)
        await self.driver.undefine(vm)
        return True

    # -- live migration (source side) ------------------------------------------------------------

    async def _migrate(self, command: MigrateVm) -> None:
        runner = MigrationRunner(self.driver, command, self._publish_progress)
        self._migrations[command.vm] = runner
        try:
            outcome = await runner.run()
        finally:
            self._migrations.pop(command.vm, None)
        self._inventory_dirty.set()
        self._finish(
            command,
            ok=outcome.ok,
            code="" if outcome.ok else "migration_failed",
            error=outcome.error,
            vm=outcome.status,
            migration=outcome.result,
        )

    def _cancel_migration(self, command: CancelMigration) -> None:
        runner = self._migrations.get(command.vm)
        if runner is None:
            self._finish(
                command,
                ok=False,
                code="invalid_state",
                error=f"no migration of vm {command.vm!r} is under way on host {self.host_id!r}; "
                "nothing to cancel",
            )
            return
        runner.cancel("cancelled by the operator")
        self._finish(command, ok=True)

    def _publish_progress(
        self, command: MigrateVm, stage: MigrationStage, sample: MigrationSample, limit_ms: int, note: str
    ) -> None:
        self._event_seq += 1
        message = MigrationProgress(
            host_id=self.host_id,
            seq=self._event_seq,
            ts=time.time(),
            vm=command.vm,
            op_id=command.op_id,
            stage=stage,
            sample=sample,
            downtime_limit_ms=limit_ms,
            note=note,
        )
        self._enqueue(topics.host_topic(self.host_id, "events"), codec.encode(message))

    def _finish(
        self,
        command: Command,
        *,
        ok: bool,
        code: ErrorCode = "",
        error: str = "",
        vm: VmStatus | None = None,
        uri: str = "",
        migration: MigrationResult | None = None,
    ) -> None:
        assert self.ledger is not None
        reply = Reply(
            op_id=command.op_id,
            host_id=self.host_id,
            ok=ok,
            ts=time.time(),
            code=code,
            error=error,
            vm=vm,
            uri=uri,
            migration=migration,
        )
        self.ledger.record(reply)
        future = self._inflight.pop(command.op_id, None)
        if future is not None and not future.done():
            future.set_result(reply)
        if not ok:
            log.warning(
                "agent %s: %s %s failed: %s", self.host_id, type(command).__name__, command.op_id, error
            )
        self._send_reply(reply)

    def _send_reply(self, reply: Reply) -> None:
        self._enqueue(topics.host_topic(self.host_id, "reply"), codec.encode(reply))


def _expired_message(command: Command) -> str:
    late = time.time() - command.deadline
    return (
        f"{type(command).__name__} {command.op_id} arrived {late:.1f}s after its deadline and was not applied; "
        "the controller must issue it again"
    )


def default_state_dir(host_id: str) -> pathlib.Path:
    base = os.environ.get("XDG_STATE_HOME") or str(pathlib.Path.home() / ".local" / "state")
    return pathlib.Path(base) / "fleetvisor" / "agent" / host_id
