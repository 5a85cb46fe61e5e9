"""What QEMU tells the engine on its own: that it exited, and asynchronous QMP events.

:class:`VmEvents` builds each :class:`~hv.qemu.instance.QemuInstance` with its callbacks bound to
the VM, and applies what the pure transitions of :mod:`hv.qemu.phase` return: the record changes
(through :class:`~hv.qemu.vm_table.VmTable`), the :class:`~hv.driver.DriverEvent` for news, and a
storage switchover started in the background.

- **Exit** (a pidfd): with QMP's ``SHUTDOWN`` reason the exit is a guest power-off (``shutdown``), a
  stop from outside (``stopped``) or a crash (``crashed``). An exit a call of the driver expected
  is not news. A source that dies while it migrates is judged only once its QMP session has read
  what QEMU wrote before dying (at most :data:`DRAIN_S`): the pidfd can wake the agent before the
  socket does, and a ``MIGRATION`` "completed" still unread means the guest runs on the
  destination, so the migration must not be reported as failed.
- **QMP events**: a guest ``RESET`` is ``rebooted``; a ``STOP``/``RESUME`` the driver did not ask
  for is ``paused``/``resumed``; QEMU's own stop and restart of the guest around a migration's
  switchover are no news. The handlers run in the QMP reader and must not await QMP.

Imports: :mod:`hv.driver` (events), :mod:`hv.qemu.instance`, :mod:`hv.qemu.phase`,
:mod:`hv.qemu.tasks` and :mod:`hv.qemu.vm_table` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from hv.driver import DriverEvent
from hv.qemu import phase
from hv.qemu.instance import QemuInstance
from hv.qemu.tasks import BackgroundTasks
from hv.qemu.vm_table import Vm, VmTable

__all__ = ["Switchover", "VmEvents"]

log = logging.getLogger(__name__)

#: How long the exit of a migrating source waits for its QMP session to read up to the end.
DRAIN_S = 1.0

#: Runs a migration's storage switchover for a VM and its QEMU (logging its failure).
Switchover = Callable[[Vm, QemuInstance], Coroutine[Any, Any, None]]


class VmEvents:
    """Turns QEMU's exits and QMP events into record changes and driver events."""

    def __init__(
        self,
        *,
        table: VmTable,
        tasks: BackgroundTasks,
        emit: Callable[[DriverEvent], None],
        switchover: Switchover,
        qmp_timeout_s: float,
    ) -> None:
        self.table = table
        self.tasks = tasks
        self.emit = emit
        self.switchover = switchover
        self.qmp_timeout_s = qmp_timeout_s

    def new_qemu(self, vm: Vm, pid: int) -> QemuInstance:
        """An instance for QEMU ``pid`` of ``vm``, reporting to this object (not yet watched)."""
        return QemuInstance(
            pid,
            vm=vm.name,
            vm_dir=vm.dir,
            qmp_timeout_s=self.qmp_timeout_s,
            on_exit=lambda qemu, wait_status: self.on_exit(vm, qemu, wait_status),
            on_event=lambda qemu, name, data: self.on_qmp_event(vm, qemu, name, data),
        )

    def on_exit(self, vm: Vm, qemu: QemuInstance, wait_status: int | None) -> None:
        """QEMU ended (pidfd). Unless a call of ours expected it, say why: shutdown, stop or crash."""
        if qemu.migration.migrating and qemu.qmp is not None and qemu.qmp.connected:
            self.tasks.spawn(self._judge_after_drain(vm, qemu, wait_status), f"exit-{vm.name}")
            return
        self._judge_exit(vm, qemu, wait_status)

    async def _judge_after_drain(self, vm: Vm, qemu: QemuInstance, wait_status: int | None) -> None:
        """Judge a migrating source's exit once QMP has delivered what QEMU wrote before it died."""
        try:
            if qemu.qmp is not None:
                await qemu.qmp.wait_disconnected(DRAIN_S)
        finally:
            self._judge_exit(vm, qemu, wait_status)

    def _judge_exit(self, vm: Vm, qemu: QemuInstance, wait_status: int | None) -> None:
        try:
            if qemu.qmp is not None:
                self.tasks.spawn(qemu.qmp.close(), f"qmp-close-{vm.name}")
            if vm.qemu is not qemu or qemu.calls.exit_expected or not self.table.opened:
                return
            outcome = phase.exit_outcome(
                state=vm.state, clues=qemu.clues, pid=qemu.pid, wait_status=wait_status
            )
            log.warning("vm %s: %s", vm.name, outcome.reason)
            self.table.powered_off(vm, outcome.state, outcome.reason, save_errors="log")
            self.emit(
                DriverEvent(vm=vm.name, event=outcome.event, state=outcome.state, reason=outcome.reason)
            )
        finally:
            qemu.exit_judged.set()

    def on_qmp_event(self, vm: Vm, qemu: QemuInstance, name: str, data: Mapping[str, Any]) -> None:
        """An asynchronous QMP event. Runs in the QMP reader: it must not await QMP."""
        if vm.qemu is not qemu:
            return
        if name == "SHUTDOWN":
            qemu.clues.shutdown_data = dict(data)
            return
        if name == "GUEST_PANICKED":
            qemu.clues.panicked = True
            return
        if name == "BLOCK_IO_ERROR":
            qemu.clues.io_error = (
                f"disk {data.get('device') or data.get('node-name', '?')}: {data.get('reason', '')}"
            )
            return
        if name == "MIGRATION":
            qemu.migration_news.set()
            if data.get("status") == "completed" and vm.facts(qemu).outgoing:
                vm.migrated_away = True  # saved with the transition below
        self.apply(vm, qemu, phase.qmp_event(vm.facts(qemu), name, data))

    def apply(self, vm: Vm, qemu: QemuInstance, change: phase.Change) -> None:
        """Carry out a transition: the record (saved), then the event, then a switchover."""
        self.table.apply(vm, qemu, change, time.time())
        if change.event is not None:
            self.emit(DriverEvent(vm=vm.name, event=change.event, state=vm.state, reason=change.event_reason))
        if change.switchover:
            self.tasks.spawn(self.switchover(vm, qemu), f"switchover-{vm.name}")
