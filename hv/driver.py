"""The one async interface every hypervisor engine implements.

The agent talks only to :class:`Driver`. An engine maps its own failures to :class:`HvError`
subclasses at this boundary, so the agent can turn them into reply codes without knowing the engine.
Engines report asynchronous happenings (a guest powered itself off, QEMU died) through the
``events`` callback given to :meth:`Driver.open`.

Lifecycle, per VM::

    define -> (start) -> running <-> paused
                  running -> shutdown (graceful) | destroy (hard) -> stopped
                  stopped -> undefine -> gone

Live migration, driven by the agent for the controller's migration state machine::

    destination: migrate_incoming -> incoming ...................... migrate_finish -> running
    source:      running -> migrate_send, then migrate_sample (+ migrate_tune / migrate_postcopy /
                 migrate_cancel) until completed -> paused ("migrated"), then undefine
    rollback:    source migrate_cancel (runs again); destination destroy + undefine
"""

from __future__ import annotations

import abc
import asyncio
import builtins
from collections.abc import Callable, Collection, Iterable
from types import TracebackType
from typing import Self

import msgspec

from protocols.messages import Capabilities, ErrorCode, VmEventKind, VmPowerState, VmStatus
from protocols.migration import MigrationPolicy, MigrationSample
from protocols.vmspec import VmSpec

__all__ = [
    "Capabilities",
    "Driver",
    "DriverEvent",
    "EngineError",
    "HvError",
    "InsufficientResources",
    "InvalidRequest",
    "InvalidState",
    "UnknownVm",
    "VmExists",
    "VmStats",
]


class HvError(Exception):
    """Base of engine errors. ``code`` is the reply code the agent sends back."""

    code: ErrorCode = "engine_error"


class UnknownVm(HvError):
    code = "unknown_vm"


class VmExists(HvError):
    code = "vm_exists"


class InvalidState(HvError):
    code = "invalid_state"


class MigrationCompleted(HvError):
    """The incoming copy holds the whole guest (its stream completed): it must be finished, not discarded."""

    code = "migration_completed"


class InsufficientResources(HvError):
    code = "insufficient_resources"


class InvalidRequest(HvError):
    """The request itself is wrong (a spec the engine cannot run as given); the message says the fix."""

    code = "invalid_request"


class EngineError(HvError):
    code = "engine_error"


#: Power states in lifecycle order, for messages that list what an operation accepts.
STATE_ORDER: tuple[VmPowerState, ...] = (
    "defined", "starting", "running", "paused", "stopping", "stopped", "crashed", "incoming",
)  # fmt: skip

#: States in which a VM's guest exists and holds its host's resources; shared by every engine so that
#: "stopping" counts as on everywhere (a guest shutting down is still running until it stops).
POWERED_ON: frozenset[VmPowerState] = frozenset({"starting", "running", "paused", "stopping"})
#: States in which a VM is defined but has no guest.
POWERED_OFF: frozenset[VmPowerState] = frozenset({"defined", "stopped", "crashed"})


def unknown_vm(host_id: str, name: str, known: Collection[str]) -> UnknownVm:
    """The error for a VM this host does not have, listing (a few of) those it has."""
    shown = ", ".join(sorted(known)[:5]) or "none"
    more = ", ..." if len(known) > 5 else ""
    return UnknownVm(
        f"vm {name!r} is not defined on host {host_id!r} (VMs here: {shown}{more}); "
        "check the name or define the VM first"
    )


def require_state(
    name: str, host_id: str, state: VmPowerState, operation: str, allowed: Iterable[VmPowerState]
) -> None:
    """Raises InvalidState naming the VM, its state, what ``operation`` needs, and what to do instead."""
    accepted = frozenset(allowed)
    if state in accepted:
        return
    ordered = [s for s in STATE_ORDER if s in accepted]
    wanted = ordered[0] if len(ordered) == 1 else f"{', '.join(ordered[:-1])} or {ordered[-1]}"
    raise InvalidState(
        f"vm {name!r} on host {host_id!r} is {state}; {operation} needs it {wanted}; {fix_hint(operation, state)}"
    )


def fix_hint(operation: str, state: VmPowerState) -> str:
    """What the caller should do instead, for an operation refused in ``state``."""
    if state == "incoming":
        return (
            "it is the destination of a live migration; wait for the migration to finish, or discard "
            "this copy with destroy and undefine"
        )
    if operation == "start":
        return "resume it instead" if state == "paused" else "it is already powered on"
    if operation == "undefine":
        return "stop it first with shutdown or destroy"
    if operation == "pause" and state == "paused":
        return "it is already paused"
    if operation == "resume" and state == "running":
        return "it is already running"
    if state == "starting":
        return "wait until it has booted and is running"
    if state == "paused":
        return "resume it first"
    if state == "running":
        return "pause it first"
    return "it is powered off; start it first"


def not_open(engine: str, host_id: str) -> EngineError:
    return EngineError(
        f"{engine} driver for host {host_id!r} is not open; use `async with driver:` or await driver.open() first"
    )


class VmStats(msgspec.Struct, frozen=True, kw_only=True):
    """One sample of a VM's resource use."""

    name: str
    state: VmPowerState
    cpu_util: float
    dirty_mib_s: float
    memory_mib: int


class DriverEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Something the engine noticed on its own (not the direct result of a call)."""

    vm: str
    event: VmEventKind
    state: VmPowerState
    reason: str = ""


EventSink = Callable[[DriverEvent], None]


class Driver(abc.ABC):
    """A hypervisor engine on one host. Use as an async context manager: ``async with driver:``."""

    #: Engine name as it appears in capabilities and the CLI (``sim``, ``qemu``).
    name: str

    def __init__(self) -> None:
        self._event_sink: EventSink | None = None

    def set_event_sink(self, sink: EventSink) -> None:
        """Where the engine reports events it notices on its own."""
        self._event_sink = sink

    def emit(self, event: DriverEvent) -> None:
        if self._event_sink is not None:
            self._event_sink(event)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Start the engine and re-attach to VMs that outlived a previous agent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Detach from the engine. VMs keep running: closing is not stopping."""

    @abc.abstractmethod
    async def capabilities(self) -> Capabilities:
        """The host inventory: arch, cores, memory, CPU features, accel, engine."""

    @abc.abstractmethod
    async def define(self, spec: VmSpec) -> VmStatus:
        """Create a VM in state ``defined``. Raises VmExists, InsufficientResources."""

    @abc.abstractmethod
    async def start(self, name: str) -> VmStatus:
        """Power a defined, stopped or crashed VM on. Raises UnknownVm, InvalidState."""

    @abc.abstractmethod
    async def shutdown(self, name: str, timeout_s: float) -> VmStatus:
        """Graceful power-off; hard power-off after ``timeout_s``. Raises UnknownVm, InvalidState."""

    @abc.abstractmethod
    async def destroy(self, name: str) -> VmStatus:
        """Immediate power-off; a VM that is already off is left as it is. Raises UnknownVm."""

    @abc.abstractmethod
    async def pause(self, name: str) -> VmStatus:
        """Freeze the vCPUs. Raises UnknownVm, InvalidState."""

    @abc.abstractmethod
    async def resume(self, name: str) -> VmStatus:
        """Unfreeze the vCPUs. Raises UnknownVm, InvalidState."""

    @abc.abstractmethod
    async def reboot(self, name: str) -> VmStatus:
        """Reset the guest. Raises UnknownVm, InvalidState."""

    @abc.abstractmethod
    async def undefine(self, name: str) -> None:
        """Forget a stopped VM and its runtime files. Raises UnknownVm, InvalidState."""

    @abc.abstractmethod
    async def list(self) -> builtins.list[VmStatus]:
        """Every VM this engine knows, in any state."""

    @abc.abstractmethod
    async def stats(self) -> builtins.list[VmStats]:
        """A resource sample of every VM that is running or paused."""

    # -- live migration -------------------------------------------------------------------------

    @abc.abstractmethod
    async def migrate_incoming(
        self, spec: VmSpec, listen_host: str, *, policy: MigrationPolicy | None = None
    ) -> tuple[VmStatus, str]:
        """Destination: define ``spec`` and start a copy in state ``incoming`` that listens on
        ``listen_host`` (on a port the engine picks). Returns its status and the URI the source sends
        to (``tcp:HOST:PORT`` for QEMU). Idempotent: a VM already waiting incoming returns the same URI.
        ``policy`` is the one the source will send with (None: the defaults); the destination needs part
        of it too, e.g. multifd must be enabled on both sides.

        Raises VmExists (a VM of that name exists and is not incoming), InsufficientResources,
        InvalidRequest (the spec cannot be migrated here, e.g. a missing base image).
        """

    @abc.abstractmethod
    async def migrate_send(self, name: str, uri: str, policy: MigrationPolicy) -> None:
        """Source: apply ``policy`` (capabilities, bandwidth, downtime limit; a block mirror first when
        ``policy.copy_storage``) and start sending to ``uri``. Returns once the migration has started.
        When a migration of this VM is already under way or has completed, does nothing: a restarted
        agent re-sending the same operation attaches to it.

        Raises UnknownVm, InvalidState (not running), InvalidRequest (disks that are neither shared nor
        copied), EngineError.
        """

    @abc.abstractmethod
    async def migrate_sample(self, name: str) -> MigrationSample:
        """Source: the migration's progress now; status ``none`` when none was started. Raises UnknownVm."""

    async def migrate_wait(self, name: str, timeout_s: float) -> None:
        """Source: return when the migration's status may have changed, or after ``timeout_s``.

        An engine that hears of status changes (QEMU's ``MIGRATION`` event) returns at once, so the
        end of a migration is noticed when it happens rather than at the next sample; this default
        just sleeps. Returning early is always allowed: the caller samples after each return.
        """
        await asyncio.sleep(timeout_s)

    @abc.abstractmethod
    async def migrate_tune(self, name: str, *, downtime_ms: int) -> None:
        """Source: change the allowed downtime of the running migration. Raises UnknownVm, InvalidState."""

    @abc.abstractmethod
    async def migrate_postcopy(self, name: str) -> None:
        """Source: switch the running migration to post-copy; from here it cannot be rolled back.

        Raises UnknownVm, InvalidState (no migration, or post-copy was not allowed by its policy).
        """

    @abc.abstractmethod
    async def migrate_cancel(self, name: str) -> VmStatus:
        """Source: cancel the pre-copy migration (if any is under way) and make sure the VM runs here.

        Also the rollback after a migration that failed on its own. Raises UnknownVm, InvalidState (in
        post-copy, or completed: the guest already runs on the destination).
        """

    async def migrate_received(self, name: str) -> bool:
        """Destination: whether the incoming copy has received the whole guest, so that it can run
        it even if its source is gone. An engine that cannot tell (this default) says False: the
        caller then trusts the source's word. Raises UnknownVm.
        """
        return False

    @abc.abstractmethod
    async def migrate_finish(self, name: str) -> VmStatus:
        """Destination: the stream completed; make sure the copy runs, and keep it as an ordinary VM.

        Idempotent (a VM already running is returned as it is). Raises UnknownVm, InvalidState (the
        copy is still waiting for its stream, or it died).
        """
