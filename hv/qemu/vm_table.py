"""The qemu engine's VM table: one record per VM, its ``state.json``, and loading them at open.

A :class:`Vm` is a VM's record (spec, directory, power state, the QEMU it runs in, migration URIs);
:class:`SavedState` is what survives the agent in ``vms/NAME/state.json``. :class:`VmTable` holds
the records, finds them by name with errors that name the fix, saves them, and records power-offs
and completed outgoing migrations (pure transitions from :mod:`hv.qemu.phase`).

Imports: :mod:`hv.driver`, :mod:`hv.storage`, :mod:`hv.qemu.instance`, :mod:`hv.qemu.phase`,
:mod:`hv.qemu.tasks` and :mod:`protocols` only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import msgspec

from hv.driver import EngineError, not_open, require_state, unknown_vm
from hv.qemu import phase
from hv.qemu.instance import QemuInstance
from hv.qemu.tasks import BackgroundTasks
from hv.storage import write_atomic
from protocols.messages import VmPowerState, VmStatus
from protocols.vmspec import VmSpec

__all__ = ["SavedState", "Vm", "VmTable"]

log = logging.getLogger(__name__)

SaveErrors = Literal["raise", "log"]


class SavedState(msgspec.Struct, frozen=True, kw_only=True):
    """A VM's ``state.json``. ``version`` changes when the layout does."""

    version: Literal[1] = 1
    state: VmPowerState
    started_at: float | None = None
    reason: str = ""
    pid: int | None = None
    #: The process's start time (clock ticks after boot): with the pid, it names one process.
    pid_start_ticks: int | None = None
    #: Source of a migration: the URI it was sent to (a re-sent migrate_send must name the same).
    migration_uri: str = ""
    #: Destination: the URI handed out while ``incoming`` (until migrate_finish or a power-off).
    incoming_uri: str = ""
    #: Source: the migration to ``migration_uri`` completed, so the copy here is only a husk (and
    #: stays one when its QEMU dies afterwards: the guest runs on the destination).
    migrated_away: bool = False


class Vm:
    """One VM's record inside the engine."""

    def __init__(self, spec: VmSpec, vm_dir: Path, saved: SavedState) -> None:
        self.spec = spec
        self.dir = vm_dir
        self.state: VmPowerState = saved.state
        self.started_at = saved.started_at
        self.reason = saved.reason
        self.lock = asyncio.Lock()
        self.qemu: QemuInstance | None = None
        self.migration_uri = saved.migration_uri
        self.incoming_uri = saved.incoming_uri
        self.migrated_away = saved.migrated_away
        #: The state file as the driver found it at open (its pid is how re-attaching starts).
        self.loaded = saved

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.spec.name

    def status(self) -> VmStatus:
        """The VM's status as the Driver interface reports it."""
        return VmStatus(
            name=self.spec.name,
            state=self.state,
            spec=self.spec,
            started_at=self.started_at,
            reason=self.reason,
        )

    def saved(self) -> SavedState:
        """What ``state.json`` holds for the VM now."""
        qemu = self.qemu
        return SavedState(
            state=self.state,
            started_at=self.started_at,
            reason=self.reason,
            pid=qemu.pid if qemu is not None else None,
            pid_start_ticks=qemu.start_ticks if qemu is not None else None,
            migration_uri=self.migration_uri,
            incoming_uri=self.incoming_uri,
            migrated_away=self.migrated_away,
        )

    def facts(self, qemu: QemuInstance) -> phase.VmFacts:
        """The VM and ``qemu`` as the pure transitions of :mod:`hv.qemu.phase` see them."""
        return phase.VmFacts(
            state=self.state,
            reason=self.reason,
            calls=qemu.calls,
            migration=qemu.migration,
            outgoing=bool(self.migration_uri) and not self.incoming_uri,
            migration_uri=self.migration_uri,
            io_error=qemu.clues.io_error,
        )


class VmTable:
    """The VMs of one driver, by name, and their state files."""

    def __init__(self, host_id: str, vms_dir: Path, tasks: BackgroundTasks) -> None:
        self.host_id = host_id
        self.vms_dir = vms_dir
        self.tasks = tasks
        self.vms: dict[str, Vm] = {}
        #: Names whose define is under way (so that two defines of one name do not race).
        self.defining: set[str] = set()
        self.opened = False

    def require_open(self) -> None:
        """Raises EngineError when the driver is not open."""
        if not self.opened:
            raise not_open("qemu", self.host_id)

    def get(self, name: str) -> Vm:
        """The VM called ``name``.

        Raises:
            EngineError: the driver is not open.
            UnknownVm: no VM of that name.
        """
        self.require_open()
        vm = self.vms.get(name)
        if vm is None:
            raise unknown_vm(self.host_id, name, self.vms)
        return vm

    def sorted(self) -> list[Vm]:
        """Every VM, sorted by name."""
        return [self.vms[name] for name in sorted(self.vms)]

    def require_state(self, vm: Vm, operation: str, allowed: Iterable[VmPowerState]) -> None:
        """Raises InvalidState naming the VM, its state and what ``operation`` needs."""
        require_state(vm.name, self.host_id, vm.state, operation, allowed)

    def require_alive(self, vm: Vm, qemu: QemuInstance, operation: str) -> None:
        """Raises EngineError when ``qemu`` exited (and was recorded) during ``operation``."""
        if vm.qemu is not qemu:
            raise EngineError(
                f"vm {vm.name!r}: qemu exited during {operation} ({vm.reason or 'no reason known'})"
            )

    def save(self, vm: Vm, *, errors: SaveErrors = "raise") -> None:
        """Write the VM's ``state.json``.

        Raises:
            EngineError: it cannot be written (with ``errors="raise"``; else the error is logged).
        """
        try:
            write_atomic(vm.dir / "state.json", msgspec.json.encode(vm.saved()))
        except OSError as exc:
            message = (
                f"vm {vm.name!r}: cannot save its state in {vm.dir}: {exc.strerror or exc}; "
                "check free space and permissions of the state directory"
            )
            if errors == "log":
                log.error("%s", message)
                return
            raise EngineError(message) from exc

    def powered_off(
        self, vm: Vm, state: Literal["stopped", "crashed"], reason: str, *, save_errors: SaveErrors = "raise"
    ) -> None:
        """Record that the VM has no QEMU any more (its QMP session is closed in the background)."""
        qemu = vm.qemu
        if qemu is not None and qemu.qmp is not None:
            self.tasks.spawn(qemu.qmp.close(), f"qmp-close-{vm.name}")
        vm.qemu = None
        vm.state = state
        vm.started_at = None
        vm.reason = reason
        vm.incoming_uri = ""
        self.save(vm, errors=save_errors)

    def apply(self, vm: Vm, qemu: QemuInstance, change: phase.Change, now: float) -> None:
        """Carry out the record part of a transition: facts, restart time, and the save (logged)."""
        vm.state = change.state
        vm.reason = change.reason
        qemu.migration = change.migration
        if change.restarted:
            vm.started_at = now
        if change.save:
            self.save(vm, errors="log")

    def migrated_away(self, vm: Vm, qemu: QemuInstance) -> None:
        """Record a completed outgoing migration: the VM idles ``paused`` here."""
        vm.migrated_away = True
        self.apply(vm, qemu, phase.migrated_away(vm.facts(qemu)), 0.0)

    def load(self) -> None:
        """Read every VM directory's spec and state file into the table.

        Raises:
            EngineError: the VM directory cannot be listed.
        """
        vms: dict[str, Vm] = {}
        try:
            entries = sorted(self.vms_dir.iterdir())
        except OSError as exc:
            raise EngineError(
                f"qemu host {self.host_id!r}: cannot list {self.vms_dir}: {exc.strerror or exc}"
            ) from exc
        for vm_dir in entries:
            if not vm_dir.is_dir():
                continue
            spec = self._read_spec(vm_dir)
            if spec is None:
                continue
            saved = _read_saved(vm_dir) or SavedState(state="stopped", reason="state.json was missing")
            vms[spec.name] = Vm(spec, vm_dir, saved)
        self.vms = vms

    def _read_spec(self, vm_dir: Path) -> VmSpec | None:
        try:
            spec = msgspec.json.decode((vm_dir / "spec.json").read_bytes(), type=VmSpec)
        except (OSError, msgspec.DecodeError) as exc:
            log.error(
                "qemu host %s: skipping %s: its spec.json cannot be read (%s); restore it, or move the "
                "directory away",
                self.host_id,
                vm_dir,
                exc,
            )
            return None
        if spec.name != vm_dir.name:
            log.error(
                "qemu host %s: skipping %s: it holds the spec of vm %r", self.host_id, vm_dir, spec.name
            )
            return None
        return spec


def _read_saved(vm_dir: Path) -> SavedState | None:
    try:
        return msgspec.json.decode((vm_dir / "state.json").read_bytes(), type=SavedState)
    except (OSError, msgspec.DecodeError):
        return None
