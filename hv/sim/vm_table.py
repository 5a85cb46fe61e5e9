"""The VMs of one sim host and the transitions every call shares: look-up, power-off, boot, sync.

:class:`VmTable` holds a driver's :class:`hv.sim.vm.Vm` records by name, whether the driver is open,
and the boot timers on the clock. After each change it hands the table to its ``save`` callback, and
it reports what happens on its own (a boot finishing, a guest leaving for its migration destination)
through its ``emit`` callback. It never awaits, so calls on one table never interleave.

Imports :mod:`hv.driver`, :mod:`hv.sim.clock`, :mod:`hv.sim.migration`, :mod:`hv.sim.vm` and
:mod:`protocols`.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Literal

from hv.driver import (
    POWERED_ON,
    DriverEvent,
    InvalidState,
    not_open,
    require_state,
    unknown_vm,
)
from hv.sim.clock import Clock
from hv.sim.migration import MigrationEvent
from hv.sim.vm import Vm
from protocols.messages import VmPowerState

__all__ = ["MIGRATED_REASON", "VmTable"]

#: What the source VM's ``reason`` starts with once its guest runs on the destination.
MIGRATED_REASON = "migrated to "


class VmTable:
    """The VMs of host ``host_id``, timed by ``clock``; ``save`` persists them, ``emit`` reports events."""

    def __init__(
        self,
        *,
        host_id: str,
        clock: Clock,
        save: Callable[[Mapping[str, Vm]], None],
        emit: Callable[[DriverEvent], None],
    ) -> None:
        self.host_id = host_id
        self.clock = clock
        self._save = save
        self._emit = emit
        self._vms: dict[str, Vm] = {}
        self.is_open = False

    # ---------------------------------------------------------------------------------------------
    # Lifetime
    # ---------------------------------------------------------------------------------------------

    def open(self, vms: Mapping[str, Vm] | None = None) -> None:
        """Attach to ``vms`` (or keep the VMs held before :meth:`close`) and resume their boots.

        Boots that came due meanwhile finish now, with their ``started`` events; the others wait on
        the clock again.
        """
        self.detach()
        if vms is not None:
            self._vms = dict(vms)
        self.is_open = True
        finished: builtins.list[Vm] = []
        for vm in self._vms.values():
            if vm.state == "starting" and vm.boot_done_at is not None:
                if vm.boot_done_at <= self.clock.now():
                    finished.append(vm)
                else:
                    vm.boot_timer = self.clock.call_at(vm.boot_done_at, _BootDone(self, vm))
            elif vm.state == "starting":
                finished.append(vm)
        for vm in finished:
            self.finish_boot(vm)

    def close(self) -> None:
        """Detach: pending boot timers are dropped, VMs keep their state."""
        self.detach()
        self.is_open = False

    def detach(self) -> None:
        """Cancel every pending boot timer; the VMs stay ``starting`` until :meth:`open`."""
        for vm in self._vms.values():
            if vm.boot_timer is not None:
                vm.boot_timer.cancel()
                vm.boot_timer = None

    # ---------------------------------------------------------------------------------------------
    # Look-up and membership
    # ---------------------------------------------------------------------------------------------

    def require_open(self) -> None:
        """Raise EngineError unless the driver is open."""
        if not self.is_open:
            raise not_open("sim", self.host_id)

    def get(self, name: str) -> Vm:
        """VM ``name``, its migration brought up to the clock.

        Raises:
            UnknownVm: no VM of that name.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        self.require_open()
        vm = self._vms.get(name)
        if vm is None:
            raise unknown_vm(self.host_id, name, self._vms)
        self.sync(vm)
        return vm

    def lookup(self, name: str) -> Vm | None:
        """VM ``name`` as it is, or None; no check that the driver is open, no sync."""
        return self._vms.get(name)

    def all(self) -> Collection[Vm]:
        """Every VM, in no particular order."""
        return self._vms.values()

    def by_name(self) -> builtins.list[Vm]:
        """Every VM, sorted by name."""
        return [self._vms[name] for name in sorted(self._vms)]

    def add(self, vm: Vm) -> None:
        """Hold ``vm`` under its name and save."""
        self._vms[vm.spec.name] = vm
        self.save()

    def remove(self, name: str) -> None:
        """Forget VM ``name`` and save."""
        del self._vms[name]
        self.save()

    def save(self) -> None:
        """Hand the table to the ``save`` callback (raises what it raises)."""
        self._save(self._vms)

    # ---------------------------------------------------------------------------------------------
    # Transitions
    # ---------------------------------------------------------------------------------------------

    def require_state(self, vm: Vm, operation: str, allowed: Iterable[VmPowerState]) -> None:
        """Raise InvalidState unless ``vm`` is in one of ``allowed``; an incoming copy gets its own fix."""
        accepted = frozenset(allowed)
        if vm.state == "incoming" and "incoming" not in accepted:
            raise InvalidState(
                f"vm {vm.spec.name!r} on host {self.host_id!r} is incoming (a copy waiting for a live "
                f"migration); it cannot {operation}: finish the migration with migrate_finish, or discard "
                "the copy with destroy and undefine"
            )
        require_state(vm.spec.name, self.host_id, vm.state, operation, accepted)

    def sync_all(self) -> None:
        """Bring every VM's migration up to the clock."""
        for vm in self._vms.values():
            self.sync(vm)

    def sync(self, vm: Vm) -> None:
        """Bring ``vm``'s migration up to the clock; a source whose guest has left becomes paused."""
        run = vm.migration
        if run is None:
            return
        run.advance(self.clock.now())
        if run.handover_at is None or run.saved.handed_over:
            return
        run.mark_handed_over()
        if vm.state in POWERED_ON:
            vm.cancel_boot()
            vm.state = "paused"
            vm.reason = f"{MIGRATED_REASON}{run.saved.uri}"
            self.save()
            self._emit(DriverEvent(vm=vm.spec.name, event="paused", state="paused", reason=vm.reason))
        else:
            self.save()

    def begin_boot(self, vm: Vm, done_at: float) -> None:
        """Make ``vm`` ``starting`` until clock time ``done_at``, when a timer finishes its boot."""
        vm.state = "starting"
        vm.boot_done_at = done_at
        vm.boot_timer = self.clock.call_at(vm.boot_done_at, _BootDone(self, vm))

    def finish_boot(self, vm: Vm) -> None:
        """Make a booting ``vm`` ``running``, save, and emit ``started``."""
        vm.boot_timer = None
        vm.boot_done_at = None
        vm.state = "running"
        self.save()
        self._emit(DriverEvent(vm=vm.spec.name, event="started", state="running"))

    def power_off(self, vm: Vm, state: Literal["stopped", "crashed"], reason: str = "") -> None:
        """Power ``vm`` off into ``state``; a migration it is the source of fails."""
        run = vm.migration
        if run is not None and run.under_way and vm.state != "incoming":
            why = f"the source VM was {'stopped' if state == 'stopped' else 'crashed: ' + reason}"
            run.record(MigrationEvent(at=self.clock.now(), kind="fail", reason=why))
        vm.cancel_boot()
        vm.state = state
        vm.started_at = None
        vm.reason = reason
        self.save()


class _BootDone:
    """The timer callback that ends one VM's boot; a class so a stale timer can tell it is stale."""

    __slots__ = ("table", "vm")

    def __init__(self, table: VmTable, vm: Vm) -> None:
        self.table = table
        self.vm = vm

    def __call__(self) -> None:
        vm = self.vm
        # Stopping, crashing or closing cancels the timer; this check is the second line of defence, so
        # that only a VM still booting, and still this table's, ever finishes.
        if vm.state != "starting" or self.table.lookup(vm.spec.name) is not vm:
            return
        self.table.finish_boot(vm)
