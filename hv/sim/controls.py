"""What tests, demos and trace replays do to a sim host beyond the Driver interface.

They change what a guest pretends to do (:meth:`SimControls.set_workload`), make a guest crash
(:meth:`SimControls.inject_crash`) and read the host's own load (:meth:`SimControls.host_sample`).
:class:`hv.sim.driver.SimDriver` exposes them as its own methods.

Imports :mod:`hv.driver`, :mod:`hv.sim` parts other than the driver, and :mod:`protocols`.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from hv.driver import POWERED_ON, DriverEvent
from hv.sim.host_model import HostModel, HostSample
from hv.sim.migration import MigrationEvent
from hv.sim.vm_table import VmTable
from protocols.messages import VmStatus
from protocols.vmspec import VmWorkload

__all__ = ["SimControls"]


class SimControls:
    """Controls over the VMs of ``table`` on ``host``; ``emit`` reports the events they cause."""

    def __init__(self, *, table: VmTable, host: HostModel, emit: Callable[[DriverEvent], None]) -> None:
        self._table = table
        self._host = host
        self._emit = emit

    def set_workload(
        self, name: str, cpu_util: float | None = None, dirty_mib_s: float | None = None
    ) -> None:
        """Change what VM ``name``'s guest does from now on (``None`` keeps the current value).

        Raises:
            UnknownVm: no VM of that name.
            ValueError: ``cpu_util`` is outside 0..1 or ``dirty_mib_s`` outside 0..100000.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._table.get(name)
        changes: dict[str, float] = {}
        if cpu_util is not None:
            changes["cpu_util"] = cpu_util
        if dirty_mib_s is not None:
            changes["dirty_mib_s"] = dirty_mib_s
        if not changes:
            return
        # Convert rather than replace, so the new workload meets the same limits as one from the bus
        # (and the saved table stays loadable).
        try:
            workload = msgspec.convert({**msgspec.to_builtins(vm.spec.workload), **changes}, VmWorkload)
        except msgspec.ValidationError as exc:
            raise ValueError(
                f"vm {name!r}: workload rejected: {exc}; cpu_util must be within 0..1 and "
                "dirty_mib_s within 0..100000"
            ) from exc
        vm.spec = msgspec.structs.replace(vm.spec, workload=workload)
        run = vm.migration
        if dirty_mib_s is not None and run is not None and run.under_way:
            run.record(MigrationEvent(at=self._table.clock.now(), kind="dirty", value=workload.dirty_mib_s))
        self._table.save()

    def inject_crash(self, name: str, reason: str = "injected crash") -> VmStatus:
        """Crash powered-on VM ``name`` as if its guest or emulator died, and emit ``crashed``.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not powered on.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._table.get(name)
        self._table.require_state(vm, "a crash", POWERED_ON)
        self._table.power_off(vm, "crashed", reason=reason)
        self._emit(DriverEvent(vm=name, event="crashed", state="crashed", reason=reason))
        return vm.status()

    def host_sample(self) -> HostSample:
        """The host's CPU use, memory held by powered-on VMs, and power draw, right now.

        Raises:
            EngineError: the driver is not open.
        """
        self._table.require_open()
        self._table.sync_all()
        return self._host.sample(self._table.all(), self._table.clock.now())
