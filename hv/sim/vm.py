"""One sim VM: the mutable record a driver keeps of it, and the frozen form it is saved in.

A :class:`Vm` is plain data with a few helpers; the power transitions that change it live in
:mod:`hv.sim.vm_table`. Imports :mod:`hv.sim.clock`, :mod:`hv.sim.migration` and :mod:`protocols`.
"""

from __future__ import annotations

import msgspec

from hv.sim.clock import TimerHandle
from hv.sim.migration import MigrationRun, SavedMigration
from protocols.messages import VmPowerState, VmStatus
from protocols.vmspec import VmSpec

__all__ = ["Phases", "SavedVm", "Vm"]

#: A VM's wobble parameters: (phase, slow period, fast period) for CPU use, then for the dirty rate.
Phases = tuple[float, float, float, float, float, float]


class SavedVm(msgspec.Struct, frozen=True, kw_only=True):
    """One VM as the state file holds it."""

    spec: VmSpec
    state: VmPowerState
    started_at: float | None = None
    reason: str = ""
    #: When a ``starting`` VM becomes ``running`` (clock time).
    boot_done_at: float | None = None
    #: The VM's latest outgoing live migration, kept until the VM is undefined or migrates again.
    migration: SavedMigration | None = None


class Vm:
    """One VM's mutable runtime record inside a driver."""

    __slots__ = (
        "boot_done_at", "boot_timer", "migration", "phases", "reason", "spec", "started_at", "state",
    )  # fmt: skip

    def __init__(
        self,
        spec: VmSpec,
        state: VmPowerState,
        phases: Phases,
        started_at: float | None = None,
        reason: str = "",
        boot_done_at: float | None = None,
    ) -> None:
        self.spec = spec
        self.state: VmPowerState = state
        self.phases = phases
        self.started_at = started_at
        self.reason = reason
        self.boot_done_at = boot_done_at
        self.boot_timer: TimerHandle | None = None
        self.migration: MigrationRun | None = None

    @classmethod
    def from_saved(cls, saved: SavedVm, phases: Phases) -> Vm:
        """The runtime record of a VM read back from the state file, its migration included."""
        vm = cls(
            saved.spec,
            saved.state,
            phases,
            started_at=saved.started_at,
            reason=saved.reason,
            boot_done_at=saved.boot_done_at,
        )
        if saved.migration is not None:
            vm.migration = MigrationRun(saved.migration)
        return vm

    def status(self) -> VmStatus:
        """The VM as the Driver interface reports it."""
        return VmStatus(
            name=self.spec.name,
            state=self.state,
            spec=self.spec,
            started_at=self.started_at,
            reason=self.reason,
        )

    def saved(self) -> SavedVm:
        """The VM as the state file holds it."""
        return SavedVm(
            spec=self.spec,
            state=self.state,
            started_at=self.started_at,
            reason=self.reason,
            boot_done_at=self.boot_done_at,
            migration=None if self.migration is None else self.migration.saved,
        )

    def cancel_boot(self) -> None:
        """Drop the pending boot, if any: its timer and its due time."""
        if self.boot_timer is not None:
            self.boot_timer.cancel()
            self.boot_timer = None
        self.boot_done_at = None

    def unthrottled(self) -> float:
        """The share of its vCPU time the VM gets while auto-converge throttles it (1 when not throttled)."""
        run = self.migration
        if run is None or run.phase != "precopy":
            return 1.0
        return 1.0 - run.throttle / 100.0
