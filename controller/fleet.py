"""The fleet service: the controller's core, between the bus, the store and the API.

It keeps the store true to what agents report (reconciliation), turns API requests into persistent
operations, and drives each operation to an end by sending commands and waiting for replies.

How an operation survives trouble:
- Its row is written in the same transaction as the VM's claim, before any command leaves.
- Commands carry the operation id and the operation's deadline. The agent applies an id once and
  ignores commands past their deadline, so the controller may re-send freely.
- After a controller restart every ``running`` operation is resumed by re-sending its command; a
  reply that arrived while the controller was away is delivered by the broker (persistent session).
- When the deadline passes without a reply the operation fails and the claim is released; should the
  agent apply it anyway, reconciliation adopts what it reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from controller import admission
from controller.errors import ApiError
from controller.events import EventHub
from controller.ha import HaManager, HaSettings
from controller.migration import MigrationManager, MigrationSettings
from controller.power_manager import PowerManager, PowerSettings
from controller.rate_limit import InboundLimiter
from controller.scheduler import (
    GROUP_LABEL,
    Decision,
    FleetState,
    PlacementRequest,
    Scheduler,
    SchedulerSettings,
    SchedulingHints,
    UnknownPolicyError,
)
from controller.store import HostRecord, OperationRecord, OpKind, Store, VmRecord, VmState
from protocols import codec, topics
from protocols.bus import Bus
from protocols.messages import (
    Command,
    DefineVm,
    DestroyVm,
    HostInventory,
    HostState,
    HostTelemetry,
    MigrationProgress,
    PauseVm,
    RebootVm,
    RefreshInventory,
    Reply,
    ResumeVm,
    ShutdownVm,
    StartVm,
    UndefineVm,
    VmEvent,
    VmPowerState,
    VmStatus,
)
from protocols.vmspec import VmSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FleetSettings:
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    #: How long an operation may take before it fails and releases what it claimed.
    operation_timeout_s: float = 60.0
    #: How long to wait for a reply before sending the command again (same operation id).
    command_retry_s: float = 5.0
    ha: HaSettings = field(default_factory=HaSettings)
    migration: MigrationSettings = field(default_factory=MigrationSettings)
    power: PowerSettings = field(default_factory=PowerSettings)


_POWER_TO_VM_STATE: dict[VmPowerState, VmState] = {
    "defined": "stopped",
    "starting": "starting",
    "running": "running",
    "paused": "paused",
    "stopping": "stopping",
    "stopped": "stopped",
    "crashed": "crashed",
    "incoming": "migrating",
}


class FleetService:
    """Owns the store and speaks to agents through the bus."""

    def __init__(
        self, store: Store, bus: Bus, settings: FleetSettings | None = None, telemetry_bus: Bus | None = None
    ) -> None:
        self.store = store
        self.bus = bus
        #: Telemetry (the heartbeat) may arrive on a connection of its own.
        self.telemetry_bus = telemetry_bus or bus
        self.settings = settings or FleetSettings()
        self.events = EventHub(store)
        self.decoder = codec.InboundDecoder()
        self.limiter = InboundLimiter()
        self.telemetry: dict[str, HostTelemetry] = {}
        self.telemetry_seen: dict[str, float] = {}
        self.telemetry_count = 0
        #: The latest inventory each host reported: what it says it runs, for views and invariant checks.
        self.inventories: dict[str, HostInventory] = {}
        self._boot_ids: dict[str, str] = {}
        self._reply_waiters: dict[str, asyncio.Future[Reply]] = {}
        self._early_replies: OrderedDict[str, Reply] = OrderedDict()
        self._host_online: dict[str, asyncio.Event] = {}
        self._op_tasks: dict[str, asyncio.Task[None]] = {}
        self._op_done: dict[str, asyncio.Event] = {}
        self._closing = False
        self._adopted: list[str] = []
        self._deferred: dict[tuple[str, str], tuple[Callable[[str, bytes], None], str, bytes]] = {}
        self._drainer: asyncio.Task[None] | None = None
        self.ha = HaManager(self, self.settings.ha)
        self.migrations = MigrationManager(self, self.settings.migration)
        #: The scheduler's view of capacity: numpy columns kept in step with the store on every claim,
        #: release, join and liveness change, and resynchronised from the store after each connect.
        hosts = store.hosts()
        self.fleet_state = FleetState.from_records(
            hosts,
            store.usage(),
            {h.host_id: h.labels for h in hosts},
            vms=store.vms(),
            capacity=self.settings.scheduler.capacity,
        )
        self.scheduler = Scheduler(self.fleet_state, self.settings.scheduler)
        #: Balancing and power: consolidation, standby and power-on in one loop (see power_manager).
        self.power = PowerManager(self, self.settings.power)
        for family, handler in (
            ("state", self._on_state),
            ("inventory", self._on_inventory),
            ("events", self._on_event),
            ("reply", self._on_reply),
        ):
            bus.subscribe(topics.all_hosts(family), self._limited(handler), qos=1)  # type: ignore[arg-type]
        self.telemetry_bus.subscribe(topics.all_hosts("telemetry"), self._limited(self._on_telemetry), qos=0)
        bus.on_connect(self._request_inventories)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> int:
        """Start background work (HA, power) and resume unfinished operations. Returns how many resumed."""
        self.ha.start()
        self.power.start()
        self._drainer = asyncio.get_running_loop().create_task(self._drain_deferred(), name="deferred")
        return self.resume_operations()

    def resume_operations(self) -> int:
        """Resume every operation a previous controller left running. Returns how many."""
        ops = self.store.running_operations()
        for op in ops:
            log.info("resuming operation %s (%s %s)", op.op_id, op.kind, op.vm)
            self.start_runner(op)
        if ops:
            self.events.emit("controller.resumed", f"resumed {len(ops)} unfinished operation(s)")
        return len(ops)

    async def close(self) -> None:
        self._closing = True
        await self.power.close()
        await self.ha.close()
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
        tasks = list(self._op_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _request_inventories(self, first: bool) -> None:
        """After every (re)connect, ask each known host for its full inventory (anti-entropy).

        Retained inventories already arrive on subscribe, but they only reflect the last change the
        agent noticed itself; this closes the gap for anything that changed while we were away.
        """
        drifted = self.fleet_state.resync(self.store.usage())
        if drifted:
            log.warning("scheduler state drifted from the store on %s; resynchronised", ", ".join(drifted))
        deadline = time.time() + 30
        for host in self.store.hosts():
            command = RefreshInventory(op_id=f"refresh-{uuid.uuid4().hex}", deadline=deadline)
            await self.bus.publish(
                topics.host_topic(host.host_id, "cmd"), codec.encode(command), qos=1, expiry_s=30
            )

    # -- bus handlers (quick, never await) ------------------------------------------------------

    def _limited(self, handler: Callable[[str, bytes], None]) -> Callable[[str, bytes], None]:
        """Wrap a bus handler with the per-host rate limit (checked before any decoding).

        Over the limit, telemetry, events and replies are dropped (and counted). A host's state and
        inventory are not: each message replaces the last, so the newest is kept aside and handled
        when the host's bucket allows. Dropping it would leave the controller with a stale picture
        until the host's next change, which may never come.
        """
        limiter = self.limiter
        deferred = self._deferred

        def limited(topic: str, payload: bytes) -> None:
            parts = topic.split("/", 5)
            if len(parts) == 5:
                if not limiter.allow(parts[3], parts[4]):
                    if parts[4] in ("state", "inventory"):
                        deferred[(parts[3], parts[4])] = (handler, topic, payload)
                    return
                deferred.pop((parts[3], parts[4]), None)  # this newer message supersedes a held-back one
            handler(topic, payload)

        return limited

    async def _drain_deferred(self) -> None:
        """Handle the newest held-back state or inventory of each host as its rate allows."""
        while True:
            await asyncio.sleep(0.1)
            for key in list(self._deferred):
                if self.limiter.allow(*key, count_drop=False):
                    handler, topic, payload = self._deferred.pop(key)
                    try:
                        handler(topic, payload)
                    except Exception:
                        log.exception("handling a held-back %s of %s failed", key[1], key[0])

    def _decode(self, topic: str, payload: bytes) -> msgspec.Struct | None:
        return self.decoder.decode(topic, payload)

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        message = self.decoder.decode(topic, payload)
        if isinstance(message, HostTelemetry):
            self.telemetry[message.host_id] = message
            self.telemetry_seen[message.host_id] = time.monotonic()
            self.telemetry_count += 1
            self.ha.heartbeat(message.host_id)

    def _on_state(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if not isinstance(message, HostState):
            return
        known_boot = self._boot_ids.get(message.host_id)
        if not message.online and known_boot is not None and message.boot_id != known_boot:
            log.info("ignoring a stale offline state of %s from an earlier agent run", message.host_id)
            return
        if message.online:
            self._boot_ids[message.host_id] = message.boot_id
        if self.store.host(message.host_id) is None:
            return  # the inventory (hello) creates the host; it follows the online state
        self.ha.host_state(message.host_id, message.online, message.reason)
        self.fleet_state.set_online(message.host_id, message.online)
        if self.store.set_host_online(message.host_id, message.online, message.reason):
            if message.online:
                self.events.emit(
                    "host.online",
                    f"host {message.host_id} is online ({message.reason})",
                    host_id=message.host_id,
                )
            else:
                self.telemetry.pop(message.host_id, None)
                self.events.emit(
                    "host.offline",
                    f"host {message.host_id} is offline ({message.reason})",
                    host_id=message.host_id,
                )
        self._online_event(message.host_id, message.online)

    def _online_event(self, host_id: str, online: bool) -> None:
        event = self._host_online.setdefault(host_id, asyncio.Event())
        if online:
            event.set()
        else:
            event.clear()

    def _on_inventory(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if not isinstance(message, HostInventory):
            return
        newest = self.inventories.get(message.host_id)
        if newest is not None and _older(message, newest):
            # A QoS 1 retry or a restored retained copy overtook a newer picture; applying it would
            # mark VMs created since as missing.
            log.info(
                "host %s: ignoring inventory #%d (%s): #%d from %s is newer",
                message.host_id, message.seq, message.boot_id[:8], newest.seq, newest.boot_id[:8],
            )  # fmt: skip
            return
        self.reconcile(message)

    def _on_event(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if isinstance(message, MigrationProgress):
            self.migrations.on_progress(message)
            return
        if not isinstance(message, VmEvent):
            return
        record = self.store.vm(message.vm)
        if record is not None and record.host_id == message.host_id and record.op_id is None:
            new_state = _POWER_TO_VM_STATE[message.state]
            if message.event == "undefined":
                return
            if record.state != new_state:
                self.store.update_vm(message.vm, state=new_state)
        reason = f" ({message.reason})" if message.reason else ""
        self.events.emit(
            f"vm.{message.event}",
            f"vm {message.vm} {message.event} on {message.host_id}{reason}",
            host_id=message.host_id,
            vm=message.vm,
            op_id=message.op_id,
        )

    def _on_reply(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if not isinstance(message, Reply):
            return
        if message.op_id.startswith("refresh-"):
            return  # the inventory it triggered is what matters
        waiter = self._reply_waiters.get(message.op_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
            return
        op = self.store.operation(message.op_id)
        if op is not None and op.state == "failed":
            self._apply_late_reply(op, message)
            return
        self._early_replies[message.op_id] = message
        while len(self._early_replies) > 10_000:
            self._early_replies.popitem(last=False)

    # -- reconciliation -------------------------------------------------------------------------

    def reconcile(self, inventory: HostInventory) -> None:
        """Make the store agree with what a host reports it runs."""
        host_id = inventory.host_id
        self.inventories[host_id] = inventory
        is_new = self.store.host(host_id) is None
        self._boot_ids[host_id] = inventory.boot_id
        with self.store.transaction():
            self.store.upsert_host(
                host_id=host_id,
                online=True,
                boot_id=inventory.boot_id,
                address=inventory.address,
                agent_version=inventory.agent_version,
                capabilities=inventory.capabilities,
                reason=f"inventory ({inventory.reason})",
                agent_labels=inventory.labels,
            )
            reported = {vm.name: vm for vm in inventory.vms}
            for status in inventory.vms:
                self._reconcile_reported(host_id, status)
            for record in self.store.vms(host_id):
                if record.name not in reported and record.op_id is None and record.state != "missing":
                    self.store.update_vm(
                        record.name, state="missing", error=f"host {host_id} does not report it"
                    )
                    self.events.emit(
                        "vm.missing",
                        f"vm {record.name} is recorded on {host_id} but the host does not report it",
                        host_id=host_id,
                        vm=record.name,
                    )
        host = self.store.host(host_id)
        assert host is not None
        self.fleet_state.upsert_host(host, host.labels)
        for adopted in self._adopted:
            found = self.store.vm(adopted)
            if found is not None and found.host_id is not None:
                spec = found.spec
                self.fleet_state.adopt(adopted, found.host_id, spec.vcpus, spec.memory_mib, spec.disk_gib)
        self._adopted.clear()
        if is_new:
            caps = inventory.capabilities
            self.events.emit(
                "host.joined",
                f"host {host_id} joined: {caps.engine}/{caps.accel}, {caps.cores} cores, {caps.memory_mib} MiB",
                host_id=host_id,
            )
        self._online_event(host_id, True)

    def _reconcile_reported(self, host_id: str, status: VmStatus) -> None:
        record = self.store.vm(status.name)
        state = _POWER_TO_VM_STATE[status.state]
        if record is None:
            self.store.insert_vm(status.spec, host_id, state, None)
            self._adopted.append(status.name)
            self.events.emit(
                "vm.adopted",
                f"vm {status.name} found on {host_id} and adopted",
                host_id=host_id,
                vm=status.name,
            )
            return
        if record.host_id is None and record.op_id is None:
            self.store.update_vm(status.name, host_id=host_id, state=state, error="")
            self._adopted.append(status.name)
            self.events.emit(
                "vm.adopted",
                f"vm {status.name} found on {host_id}; record corrected",
                host_id=host_id,
                vm=status.name,
            )
            return
        if record.host_id != host_id:
            moved = self.store.last_operation(status.name, "restart")
            if moved is not None and moved.params.get("from_host") == host_id and moved.state != "failed":
                self.ha.clean_stale_copy(host_id, status.name, "it was restarted elsewhere")
                return
            if record.migrating_to == host_id:
                return  # the incoming copy of a migration under way
            if record.op_id is not None and self.migrations.source_of(record.op_id) == host_id:
                return  # the paused husk a migration is about to clean up
            if self.migrations.leftover_of(host_id, status.name):
                self.ha.clean_stale_copy(host_id, status.name, f"it migrated and runs on {record.host_id}")
                return
        if record.host_id != host_id:
            self.events.emit(
                "vm.conflict",
                f"vm {status.name} is reported by {host_id} but recorded on {record.host_id}",
                host_id=host_id,
                vm=status.name,
            )
            return
        if record.op_id is None and record.state != state:
            self.store.update_vm(status.name, state=state, error="")
            self.events.emit(
                "vm.state",
                f"vm {status.name} is {state} on {host_id} (was recorded {record.state})",
                host_id=host_id,
                vm=status.name,
            )

    # -- queries --------------------------------------------------------------------------------

    def require_vm(self, name: str) -> VmRecord:
        record = self.store.vm(name)
        if record is None:
            raise ApiError(
                404, "unknown_vm", f"vm {name!r} does not exist; list VMs with `fleetvisor vm list`"
            )
        return record

    def require_host(self, host_id: str) -> HostRecord:
        record = self.store.host(host_id)
        if record is None:
            raise ApiError(
                404, "unknown_host", f"host {host_id!r} is not known; list hosts with `fleetvisor host list`"
            )
        return record

    def require_operation(self, op_id: str) -> OperationRecord:
        record = self.store.operation(op_id)
        if record is None:
            raise ApiError(404, "unknown_operation", f"operation {op_id!r} does not exist")
        return record

    def update_host(
        self, host_id: str, *, labels: dict[str, str | None] | None = None, maintenance: bool | None = None
    ) -> HostRecord:
        """Set operator labels (a None value removes one) and maintenance mode.

        Raises:
            ApiError: 404 for an unknown host.
        """
        host = self.require_host(host_id)
        operator_labels = None
        if labels is not None:
            operator_labels = {k: v for k, v in {**host.operator_labels, **labels}.items() if v is not None}
        with self.store.transaction():
            self.store.set_host_admin(host_id, maintenance=maintenance, operator_labels=operator_labels)
        updated = self.require_host(host_id)
        self.fleet_state.upsert_host(updated, updated.labels)
        if maintenance is not None and maintenance != host.maintenance:
            self.fleet_state.set_maintenance(host_id, maintenance)
            what = "enters maintenance: no new VMs are placed there" if maintenance else "leaves maintenance"
            self.events.emit("host.maintenance", f"host {host_id} {what}", host_id=host_id)
        if operator_labels is not None and operator_labels != host.operator_labels:
            shown = ", ".join(f"{k}={v}" for k, v in sorted(updated.labels.items())) or "none"
            self.events.emit("host.labels", f"host {host_id} labels: {shown}", host_id=host_id)
        return updated

    # -- VM operations --------------------------------------------------------------------------

    def plan_vm(self, spec: VmSpec, hints: SchedulingHints | None = None) -> Decision:
        """Where ``spec`` would go now, with the explanation; claims nothing (``--dry-run``).

        Raises:
            ApiError: 400 for an unknown policy.
        """
        try:
            return self.scheduler.select(PlacementRequest.from_spec(spec, hints))
        except UnknownPolicyError as exc:
            raise ApiError(400, "unknown_policy", str(exc)) from None

    def create_vm(
        self, spec: VmSpec, start: bool = True, hints: SchedulingHints | None = None
    ) -> tuple[VmRecord, OperationRecord, Decision]:
        """Place ``spec``, claim the host, record the VM and its create operation, and start it.

        Raises:
            ApiError: 409 if the name is taken, no host fits, or admission control refuses (with the
                explanation); 400 for an unknown policy.
        """
        if self.store.vm(spec.name) is not None:
            raise ApiError(
                409, "vm_exists", f"vm {spec.name!r} already exists; choose another name or delete it first"
            )
        spec = self._with_group(spec, hints)
        request = PlacementRequest.from_spec(spec, hints)
        # No await from here to the store write: in one event loop this is the claim lock.
        try:
            decision = self.scheduler.select_and_claim(request)
        except UnknownPolicyError as exc:
            raise ApiError(400, "unknown_policy", str(exc)) from None
        if decision.refusal is not None or decision.host_id is None:
            raise self.refusal_error(decision)
        host_id = decision.host_id
        assert host_id is not None
        try:
            self._admit(spec, host_id)
            record, op = self._record_create(spec, host_id, start)
        except BaseException:
            self.fleet_state.release(spec.name, host_id)
            raise
        self.start_runner(op)
        return record, op, decision

    def create_batch(
        self, template: VmSpec, count: int, start: bool = True, hints: SchedulingHints | None = None
    ) -> list[tuple[VmRecord, OperationRecord]]:
        """Create ``count`` VMs named ``<name>-1..N``, planned as a whole (an anti-affinity group is
        spread before anything is claimed) and claimed all or nothing.

        Raises:
            ApiError: 409 if a name is taken or the batch cannot be placed, with the reason.
        """
        specs = [msgspec.structs.replace(template, name=f"{template.name}-{i}") for i in range(1, count + 1)]
        taken = [s.name for s in specs if self.store.vm(s.name) is not None]
        if taken:
            raise ApiError(
                409, "vm_exists", f"vms {', '.join(taken)} already exist; choose another name prefix"
            )
        specs = [self._with_group(s, hints) for s in specs]
        requests = [PlacementRequest.from_spec(s, hints) for s in specs]
        try:
            batch = self.scheduler.select_batch(requests)
        except UnknownPolicyError as exc:
            raise ApiError(400, "unknown_policy", str(exc)) from None
        if not batch.ok:
            raise ApiError(409, "no_valid_host", f"batch {template.name!r} of {count}: {batch.message}")
        claims = self.scheduler.commit_batch(requests, batch)
        placed = [
            (s, d.host_id) for s, d, c in zip(specs, batch.decisions, claims, strict=True) if c and d.host_id
        ]
        created = []
        try:
            with self.store.transaction():
                for spec, host_id in placed:
                    created.append(self._insert_create(spec, host_id, start))
        except BaseException:
            for spec, host_id in placed:
                self.fleet_state.release(spec.name, host_id)
            raise
        for record, op in created:
            self.events.emit(
                "vm.creating",
                f"vm {record.name} placed on {record.host_id}",
                host_id=record.host_id or "",
                vm=record.name,
                op_id=op.op_id,
            )
            self.start_runner(op)
        return created

    @staticmethod
    def _with_group(spec: VmSpec, hints: SchedulingHints | None) -> VmSpec:
        # Group membership is kept on the VM, so the scheduler rebuilds its groups after a restart.
        if hints is None or hints.group is None:
            return spec
        return msgspec.structs.replace(spec, labels={**spec.labels, GROUP_LABEL: hints.group})

    @staticmethod
    def refusal_error(decision: Decision) -> ApiError:
        """The 409 a refused decision becomes, with the explanation in its detail."""
        refusal = decision.refusal
        message = refusal.message if refusal is not None else f"no host for vm {decision.vm!r}"
        return ApiError(
            409,
            "no_valid_host",
            message + "; try a smaller VM or add hosts",
            {
                "rejected": dict(decision.explanation.rejected),
                "explanation": msgspec.to_builtins(decision.explanation),
            },
        )

    def _record_create(self, spec: VmSpec, host_id: str, start: bool) -> tuple[VmRecord, OperationRecord]:
        with self.store.transaction():
            record, op = self._insert_create(spec, host_id, start)
        self.events.emit(
            "vm.creating",
            f"vm {spec.name} placed on {host_id}",
            host_id=host_id,
            vm=spec.name,
            op_id=op.op_id,
        )
        return record, op

    def _insert_create(self, spec: VmSpec, host_id: str, start: bool) -> tuple[VmRecord, OperationRecord]:
        """The VM row (its claim) and its create operation; call inside a transaction."""
        deadline = time.time() + self.settings.operation_timeout_s
        op = self.store.insert_operation(
            kind="create", vm=spec.name, host_id=host_id, params={"start": start}, deadline=deadline
        )
        return self.store.insert_vm(spec, host_id, "creating", op.op_id), op

    def _admit(self, spec: VmSpec, host_id: str) -> None:
        """Raises ApiError 409 when HA admission control refuses ``spec`` on ``host_id``."""
        tolerate = self.settings.ha.host_failures_to_tolerate
        if tolerate <= 0:
            return
        usage = self.store.usage()
        why = admission.problem(
            spec, host_id, self.store.hosts(), usage, self.store.vms(), self.settings.scheduler, tolerate
        )
        if why is not None:
            raise ApiError(409, "admission_control", why, {"tolerate": tolerate})

    def start_vm(self, name: str) -> OperationRecord:
        return self._vm_operation(
            name, "start", {}, allowed=("stopped", "crashed", "error", "missing"), new_state="starting"
        )

    def stop_vm(self, name: str, force: bool = False, timeout_s: float = 30.0) -> OperationRecord:
        return self._vm_operation(
            name,
            "stop",
            {"force": force, "timeout_s": timeout_s},
            allowed=("running", "paused", "starting", "crashed", "missing", "stopping"),
            new_state="stopping",
        )

    def pause_vm(self, name: str) -> OperationRecord:
        return self._vm_operation(name, "pause", {}, allowed=("running",), new_state="running")

    def resume_vm(self, name: str) -> OperationRecord:
        return self._vm_operation(name, "resume", {}, allowed=("paused",), new_state="paused")

    def reboot_vm(self, name: str) -> OperationRecord:
        return self._vm_operation(name, "reboot", {}, allowed=("running",), new_state="running")

    def delete_vm(self, name: str) -> OperationRecord:
        return self._vm_operation(name, "delete", {}, allowed=None, new_state="deleting")

    def _vm_operation(
        self,
        name: str,
        kind: OpKind,
        params: dict[str, Any],
        allowed: tuple[str, ...] | None,
        new_state: VmState,
    ) -> OperationRecord:
        record = self.require_vm(name)
        if record.op_id is not None:
            busy = self.store.operation(record.op_id)
            what = busy.kind if busy else "an operation"
            raise ApiError(
                409,
                "vm_busy",
                f"vm {name!r} is busy with {what} operation {record.op_id}; wait for it to finish and retry",
            )
        if allowed is not None and record.state not in allowed:
            raise ApiError(
                409,
                "invalid_state",
                f"vm {name!r} is {record.state}; {kind} needs it to be one of: {', '.join(allowed)}",
            )
        if kind != "delete" and record.host_id is None:
            raise ApiError(
                409,
                "no_host",
                f"vm {name!r} has no host (state {record.state}); delete it and create it again",
            )
        deadline = time.time() + self.settings.operation_timeout_s
        params = {**params, "from_state": record.state}
        with self.store.transaction():
            op = self.store.insert_operation(
                kind=kind, vm=name, host_id=record.host_id, params=params, deadline=deadline
            )
            self.store.update_vm(name, state=new_state, op_id=op.op_id, error="")
        self.events.emit(
            f"vm.{kind}", f"{kind} vm {name}", host_id=record.host_id or "", vm=name, op_id=op.op_id
        )
        self.start_runner(op)
        return op

    def start_restart(self, record: VmRecord, new_host: str, failed_host: str) -> OperationRecord:
        """Move an HA VM's claim from ``failed_host`` to ``new_host`` and start it there."""
        deadline = time.time() + self.settings.operation_timeout_s
        with self.store.transaction():
            op = self.store.insert_operation(
                kind="restart",
                vm=record.name,
                host_id=new_host,
                params={"from_host": failed_host, "from_state": record.state},
                deadline=deadline,
            )
            self.store.update_vm(record.name, host_id=new_host, state="starting", op_id=op.op_id, error="")
        self.events.emit(
            "ha.restarting",
            f"vm {record.name} (HA, priority {record.spec.ha_priority}) restarting on {new_host} "
            f"after {failed_host} failed",
            host_id=new_host,
            vm=record.name,
            op_id=op.op_id,
        )
        self.start_runner(op)
        return op

    async def wait_operation(self, op_id: str, timeout: float) -> OperationRecord:
        """The operation after it ends, or as it stands after ``timeout`` seconds."""
        done = self._op_done.get(op_id)
        if done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
        return self.require_operation(op_id)

    # -- the operation runner -------------------------------------------------------------------

    def start_runner(self, op: OperationRecord) -> None:
        """Run ``op`` in the background; :meth:`wait_operation` waits for it."""
        self._op_done[op.op_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run_operation(op), name=f"op:{op.kind}:{op.vm}")
        self._op_tasks[op.op_id] = task

    def _command_for(self, op: OperationRecord, record: VmRecord) -> Command:
        common = {"op_id": op.op_id, "deadline": op.deadline}
        if op.kind in ("create", "restart"):
            return DefineVm(spec=record.spec, start=bool(op.params.get("start", True)), **common)  # type: ignore[arg-type]
        if op.kind == "start":
            return StartVm(vm=op.vm, **common)  # type: ignore[arg-type]
        if op.kind == "pause":
            return PauseVm(vm=op.vm, **common)  # type: ignore[arg-type]
        if op.kind == "resume":
            return ResumeVm(vm=op.vm, **common)  # type: ignore[arg-type]
        if op.kind == "reboot":
            return RebootVm(vm=op.vm, **common)  # type: ignore[arg-type]
        if op.kind == "stop":
            if op.params.get("force"):
                return DestroyVm(vm=op.vm, **common)  # type: ignore[arg-type]
            return ShutdownVm(vm=op.vm, timeout_s=float(op.params.get("timeout_s", 30.0)), **common)  # type: ignore[arg-type]
        return UndefineVm(vm=op.vm, **common)  # type: ignore[arg-type]

    async def _run_operation(self, op: OperationRecord) -> None:
        try:
            if op.kind == "migrate":
                await self.migrations.run(op)
                return
            if op.kind == "evacuate":
                await self.migrations.evacuate(op)
                return
            record = self.store.vm(op.vm)
            if record is None:
                self._finish(op, ok=False, error=f"vm {op.vm!r} disappeared before {op.kind} could run")
                return
            if op.kind == "delete" and record.host_id is None:
                self.store.delete_vm(op.vm)
                self.fleet_state.release(op.vm)
                self._finish(op, ok=True)
                return
            assert op.host_id is not None
            reply = await self.exchange(op.host_id, self._command_for(op, record))
            if reply is None:
                self._apply_failure(op, "timeout", self._timeout_message(op))
            elif reply.ok or self._counts_as_success(op, reply):
                self._apply_success(op, reply)
            else:
                self._apply_failure(op, reply.code, reply.error)
        except asyncio.CancelledError:
            raise  # controller shutting down: the operation stays running and resumes next start
        except Exception as exc:
            log.exception("operation %s crashed", op.op_id)
            if op.kind in ("migrate", "evacuate"):
                # Left running: the next controller start resumes it from its saved phase.
                self.events.emit("operation.stalled", f"{op.kind} {op.vm or op.host_id} hit an internal "
                                 f"error and resumes at the next controller start: {exc}", op_id=op.op_id)  # fmt: skip
            else:
                self._apply_failure(op, "internal", f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._op_tasks.pop(op.op_id, None)
            done = self._op_done.get(op.op_id)
            if done is not None and not self._closing:
                done.set()

    async def exchange(self, host_id: str, command: Command) -> Reply | None:
        """Send ``command`` to ``host_id`` until its reply arrives (or None once its deadline passes).

        While the host is offline nothing is sent; its persistent session may still deliver an earlier
        copy, and the command goes again when the host is back. The agent applies an operation id once.
        """
        early = self._early_replies.pop(command.op_id, None)
        if early is not None:
            return early
        topic = topics.host_topic(host_id, "cmd")
        payload = codec.encode(command)
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._reply_waiters[command.op_id] = waiter
        online = self._host_online.setdefault(host_id, asyncio.Event())
        host = self.store.host(host_id)
        if host is not None and host.online:
            online.set()
        try:
            while True:
                remaining = command.deadline - time.time()
                if remaining <= 0:
                    return None
                if online.is_set():
                    await self.bus.publish(topic, payload, qos=1, expiry_s=remaining)
                    wait_for: asyncio.Future[Any] = waiter
                else:
                    # Offline host: its persistent session may still deliver; re-send when it is back.
                    wait_for = asyncio.ensure_future(online.wait())
                try:
                    await asyncio.wait_for(
                        asyncio.shield(waiter) if wait_for is waiter else _first(waiter, wait_for),
                        min(remaining, self.settings.command_retry_s),
                    )
                except TimeoutError:
                    pass
                finally:
                    if wait_for is not waiter and not wait_for.done():
                        wait_for.cancel()
                if waiter.done():
                    return waiter.result()
        finally:
            self._reply_waiters.pop(command.op_id, None)

    def _timeout_message(self, op: OperationRecord) -> str:
        host = self.store.host(op.host_id or "")
        state = "offline" if host is not None and not host.online else "online"
        return (
            f"host {op.host_id} ({state}) did not answer {op.kind} of vm {op.vm} within "
            f"{self.settings.operation_timeout_s:g}s; check the agent with `fleetvisor host show {op.host_id}`"
        )

    @staticmethod
    def _counts_as_success(op: OperationRecord, reply: Reply) -> bool:
        # Deleting what is already gone is done; creating what already exists there is done.
        return (op.kind == "delete" and reply.code == "unknown_vm") or (
            op.kind == "create" and reply.code == "vm_exists"
        )

    def _apply_success(self, op: OperationRecord, reply: Reply) -> None:
        with self.store.transaction():
            if op.kind == "delete":
                self.store.delete_vm(op.vm)
                self.fleet_state.release(op.vm)
            else:
                state: VmState = (
                    _POWER_TO_VM_STATE[reply.vm.state]
                    if reply.vm
                    else ("stopped" if op.kind == "stop" else "running")
                )
                self.store.update_vm(op.vm, state=state, op_id=None, error="")
            self._finish(op, ok=True)

    def _apply_failure(self, op: OperationRecord, code: str, error: str) -> None:
        with self.store.transaction():
            record = self.store.vm(op.vm)
            if record is not None and record.op_id == op.op_id:
                if op.kind in ("create", "restart"):
                    # Release the claim: the VM did not come to exist anywhere we know of.
                    self.fleet_state.release(op.vm)
                    self.store.update_vm(op.vm, state="error", host_id=None, op_id=None, error=error)
                else:
                    previous: VmState = (
                        "missing" if code == "unknown_vm" else op.params.get("from_state", "error")
                    )
                    self.store.update_vm(op.vm, state=previous, op_id=None, error=error)
            self._finish(op, ok=False, error=f"{code}: {error}" if code else error)

    def _apply_late_reply(self, op: OperationRecord, reply: Reply) -> None:
        """A reply for an operation already failed by its timeout: the agent did act, only late.

        Only a delete is settled here: its VM is gone from the host, so the record goes too (else the
        next inventory would call the VM missing). A late create or restart needs nothing: the VM's
        record has no host, and the next inventory adopts it where it runs. Any other late reply
        changes no record; the next inventory reconciles the VM's state.
        """
        record = self.store.vm(op.vm)
        done = reply.ok or self._counts_as_success(op, reply)
        log.info("op %s (%s vm %s): late reply from %s, ok=%s", op.op_id, op.kind, op.vm, reply.host_id, done)
        if not (done and op.kind == "delete" and record is not None and record.op_id is None):
            return
        if record.host_id != reply.host_id:
            return
        late_s = reply.ts - op.deadline
        with self.store.transaction():
            self.store.delete_vm(op.vm)
            self.fleet_state.release(op.vm)
            self.store.finish_operation(
                op.op_id, "succeeded", f"the host replied {late_s:.1f}s after the timeout"
            )
        self.events.emit(
            "operation.succeeded",
            f"delete vm {op.vm}: done (host {reply.host_id} replied {late_s:.1f}s after the timeout)",
            host_id=reply.host_id,
            vm=op.vm,
            op_id=op.op_id,
        )

    def _finish(self, op: OperationRecord, ok: bool, error: str = "") -> None:
        self.store.finish_operation(op.op_id, "succeeded" if ok else "failed", error)
        if ok:
            self.events.emit(
                "operation.succeeded",
                f"{op.kind} vm {op.vm}: done",
                host_id=op.host_id or "",
                vm=op.vm,
                op_id=op.op_id,
            )
        else:
            self.events.emit(
                "operation.failed",
                f"{op.kind} vm {op.vm} failed: {error}",
                host_id=op.host_id or "",
                vm=op.vm,
                op_id=op.op_id,
            )

    # -- summaries ------------------------------------------------------------------------------

    def running_vm_count(self) -> int:
        return sum(1 for vm in self.store.vms() if vm.state == "running")

    def online_host_count(self) -> int:
        return sum(1 for host in self.store.hosts() if host.online)


async def _first(*futures: asyncio.Future[Any]) -> None:
    await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)


def _older(message: HostInventory, newest: HostInventory) -> bool:
    """Whether ``message`` describes the host as it was before ``newest`` did.

    Within one agent run the sequence number orders inventories; across runs (a new ``boot_id``) the
    host's own clock does.
    """
    if message.boot_id == newest.boot_id:
        return message.seq < newest.seq
    return message.ts < newest.ts
