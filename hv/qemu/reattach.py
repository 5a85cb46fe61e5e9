"""Finding VMs again after an agent restart: re-attaching to the QEMU a previous driver left running.

QEMU runs detached and outlives the driver. At open, :class:`Reattacher` finds each VM's QEMU by
its pid (checked against the process start time and command line, so a reused pid is not mistaken
for it), watches it again and reconnects to ``qmp.sock``. A VM whose QEMU vanished meanwhile shows
as ``crashed``, with an event. A source that was migrating picks its migration up where QEMU is.

Imports: :mod:`hv.driver` (events, errors), :mod:`hv.qemu.command_line`, :mod:`hv.qemu.instance`,
:mod:`hv.qemu.migration`, :mod:`hv.qemu.phase`, :mod:`hv.qemu.process`, :mod:`hv.qemu.qmp`,
:mod:`hv.qemu.tasks`, :mod:`hv.qemu.vm_events` and :mod:`hv.qemu.vm_table` only.
"""

from __future__ import annotations

import logging

from hv.driver import DriverEvent, EngineError
from hv.qemu import command_line
from hv.qemu.instance import QemuInstance, is_qemu_of, read_pid, reap
from hv.qemu.migration import MIGRATING, POSTCOPY
from hv.qemu.phase import SWITCHOVER_REASON, MigrationPhase
from hv.qemu.process import read_proc_stat
from hv.qemu.qmp import QmpSession, run_status
from hv.qemu.vm_events import VmEvents
from hv.qemu.vm_table import Vm, VmTable

__all__ = ["Reattacher"]

log = logging.getLogger(__name__)


class Reattacher:
    """Re-attaches one driver to the QEMUs of its VMs."""

    def __init__(self, *, table: VmTable, events: VmEvents) -> None:
        self.table = table
        self.events = events

    async def reattach(self, vm: Vm) -> None:
        """Find a VM's QEMU from an earlier driver again, or record that it is gone."""
        qemu = self._find(vm)
        if qemu is None:
            return
        vm.qemu = qemu
        try:
            qmp = await qemu.connect(qemu.qmp_timeout_s)
            status = run_status(await qmp.execute("query-status"))
        except EngineError as exc:
            vm.reason = f"qemu runs but its monitor did not answer: {exc}"
            log.warning("vm %s: %s", vm.name, vm.reason)
            return
        if qemu.exited:
            return  # the exit handler has recorded why
        if vm.state == "incoming" and status != "running":
            pass  # still receiving, or received and waiting for migrate_finish (-S)
        else:
            vm.state = "running" if status == "running" else "paused"
            if status not in ("running", "paused"):
                vm.reason = f"qemu reports the guest as {status}"
        if vm.state != "incoming" and vm.migration_uri:
            await self._reattach_migration(vm, qemu, qmp)
        self.table.save(vm, errors="log")
        log.info("vm %s: re-attached to qemu pid %d (%s)", vm.name, qemu.pid, vm.state)

    def _find(self, vm: Vm) -> QemuInstance | None:
        """The VM's QEMU, watched, if it still runs; else the VM is recorded crashed (None)."""
        saved = vm.loaded
        pid = read_pid(vm.dir / command_line.PID_FILE) or saved.pid
        stat = read_proc_stat(pid) if pid else None
        alive = (
            pid is not None
            and stat is not None
            and stat.state != "Z"
            and (saved.pid_start_ticks is None or saved.pid_start_ticks == stat.start_ticks)
            and is_qemu_of(pid, vm.dir)
        )
        qemu = self.events.new_qemu(vm, pid) if alive and pid is not None else None
        if qemu is not None:
            qemu.start_ticks = stat.start_ticks if stat is not None else None
            try:
                qemu.watch_process()
            except ProcessLookupError:  # it ended just now
                qemu = None
        if qemu is None:
            if pid is not None and stat is not None and stat.state == "Z":
                reap(pid)  # our own child, left by a driver in this process
            reason = f"qemu (pid {pid or '?'}) exited while no agent was attached; its exit status is unknown"
            log.warning("vm %s: %s", vm.name, reason)
            self.table.powered_off(vm, "crashed", reason, save_errors="log")
            self.events.emit(DriverEvent(vm=vm.name, event="crashed", state="crashed", reason=reason))
        return qemu

    async def _reattach_migration(self, vm: Vm, qemu: QemuInstance, qmp: QmpSession) -> None:
        """A source re-attached while (or after) migrating: pick the migration up where QEMU is."""
        try:
            info = await qmp.execute("query-migrate")
        except EngineError as exc:
            log.warning("vm %s: cannot see its migration after re-attaching: %s", vm.name, exc)
            return
        status = str(info.get("status", "none")) if isinstance(info, dict) else "none"
        if status in MIGRATING:
            qemu.migration = MigrationPhase.of(
                migrating=True,
                guest_stopped=vm.state == "paused" and status not in POSTCOPY,
                switched_over=qemu.migration.switched_over,
            )
            if vm.state == "paused":
                vm.reason = SWITCHOVER_REASON
            if status == "pre-switchover":
                self.events.tasks.spawn(self.events.switchover(vm, qemu), f"switchover-{vm.name}")
            if status in POSTCOPY:
                vm.reason = f"post-copy to {vm.migration_uri}: the guest runs there now"
        elif status == "completed":
            self.table.migrated_away(vm, qemu)
