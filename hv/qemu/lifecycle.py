"""The lifecycle of the qemu engine's VMs: define, start, shutdown, destroy, pause, resume, reboot,
undefine.

:class:`Lifecycle` carries out each call on one VM under that VM's lock, with the checks of
:class:`~hv.qemu.launch.Launcher`, QEMU processes from :mod:`hv.qemu.instance` (built by
:class:`~hv.qemu.vm_events.VmEvents`, which reports what happens meanwhile), and records in
:class:`~hv.qemu.vm_table.VmTable`. Outcomes of these calls are not emitted as events: the agent
reports those.

Imports: :mod:`hv.driver`, :mod:`hv.storage`, :mod:`hv.qemu.command_line`, :mod:`hv.qemu.files`,
:mod:`hv.qemu.instance`, :mod:`hv.qemu.launch`, :mod:`hv.qemu.phase`, :mod:`hv.qemu.process`,
:mod:`hv.qemu.qmp`, :mod:`hv.qemu.vm_events`, :mod:`hv.qemu.vm_table` and :mod:`protocols` only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import msgspec

from hv.driver import POWERED_OFF, POWERED_ON, EngineError, InvalidState, VmExists
from hv.qemu import command_line
from hv.qemu.files import make_private_dir
from hv.qemu.instance import QemuInstance, prepare_runtime_files, qemu_says, spawn_qemu
from hv.qemu.launch import Launcher
from hv.qemu.phase import CallPhase
from hv.qemu.process import describe_wait_status, read_proc_stat
from hv.qemu.qmp import QmpSession, run_status
from hv.qemu.vm_events import VmEvents
from hv.qemu.vm_table import SavedState, Vm, VmTable
from hv.storage import write_atomic
from protocols.messages import VmPowerState, VmStatus
from protocols.vmspec import VmSpec

__all__ = ["Lifecycle"]

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class Lifecycle:
    """Define, power and undefine VMs of one host."""

    def __init__(
        self,
        *,
        table: VmTable,
        launcher: Launcher,
        events: VmEvents,
        qemu_binary: str,
        start_timeout_s: float,
    ) -> None:
        self.table = table
        self.launcher = launcher
        self.events = events
        self.qemu_binary = qemu_binary
        self.start_timeout_s = start_timeout_s
        self.host_id = table.host_id

    async def define(self, spec: VmSpec) -> VmStatus:
        """Check a spec and create the VM's directory, ``defined`` (errors: see QemuDriver.define)."""
        table = self.table
        table.require_open()
        spec = self.launcher.validated(spec)
        name = spec.name
        if name in table.vms or name in table.defining:
            state = table.vms[name].state if name in table.vms else "being defined"
            raise VmExists(
                f"vm {name!r} already exists on host {self.host_id!r} (it is {state}); "
                "pick another name, or undefine the existing VM first"
            )
        table.defining.add(name)
        try:
            self.launcher.check_resources(spec, [vm.spec for vm in table.vms.values()])
            await self.launcher.check_files(spec)
            vm = self._create(spec, table.vms_dir / name)
            table.save(vm)
            table.vms[name] = vm
            return vm.status()
        finally:
            table.defining.discard(name)

    def _create(self, spec: VmSpec, vm_dir: Path) -> Vm:
        name = spec.name
        if vm_dir.exists():
            raise EngineError(
                f"vm {name!r}: its directory {vm_dir} exists although no such VM is known (left from "
                "a damaged VM?); move it away and define the VM again"
            )
        vm = Vm(spec, vm_dir, SavedState(state="defined"))
        try:
            make_private_dir(vm_dir)
            write_atomic(vm_dir / "spec.json", msgspec.json.encode(spec))
        except OSError as exc:
            shutil.rmtree(vm_dir, ignore_errors=True)
            raise EngineError(
                f"vm {name!r}: cannot write its directory {vm_dir}: {exc.strerror or exc}; "
                "check free space and permissions of the state directory"
            ) from exc
        return vm

    async def launch(self, vm: Vm, plan: command_line.LaunchPlan) -> QemuInstance:
        """Spawn QEMU for ``plan``, watched, as the VM's QEMU, in phase LAUNCHING.

        Raises:
            EngineError: the runtime files cannot be written or QEMU cannot be run.
        """
        argv = command_line.build_argv(self.qemu_binary, plan)
        prepare_runtime_files(vm.name, vm.dir, argv)
        pid = spawn_qemu(vm.name, vm.dir, argv)
        qemu = self.events.new_qemu(vm, pid)
        qemu.watch_process()
        stat = read_proc_stat(pid)
        qemu.start_ticks = stat.start_ticks if stat is not None else None
        vm.qemu = qemu
        qemu.calls = CallPhase.LAUNCHING
        return qemu

    async def start(self, name: str) -> VmStatus:
        """Launch QEMU and return once QMP says it runs (errors: see QemuDriver.start)."""
        vm = self.table.get(name)
        async with vm.lock:
            self.table.require_state(vm, "start", POWERED_OFF)
            qemu = await self.launch(vm, await self.launcher.plan(vm.spec, vm.dir))
            try:
                qmp = await qemu.connect(self.start_timeout_s)
                status = await qmp.execute("query-status")
            except BaseException as exc:
                # Never leave a half-started QEMU behind, cancelled or not.
                if qemu.watch is not None:
                    qemu.watch.send_signal(signal.SIGKILL)
                vm.qemu = None
                if not isinstance(exc, EngineError):
                    raise
                await qemu.wait_briefly()
                wait_status = qemu.watch.wait_status if qemu.watch is not None else None
                by_itself = wait_status is not None and os.WIFEXITED(wait_status)  # not by our SIGKILL
                why = f"qemu exited at once ({describe_wait_status(wait_status)})" if by_itself else str(exc)
                raise EngineError(f"vm {name!r} did not start: {why}; {qemu_says(vm.dir)}") from exc
            qemu.calls = CallPhase.IDLE
            if qemu.exited:
                vm.qemu = None
                raise EngineError(f"vm {name!r} did not start: qemu exited right away; {qemu_says(vm.dir)}")
            vm.state = "running" if run_status(status) == "running" else "paused"
            vm.started_at = time.time()
            vm.reason = ""
            vm.migration_uri = ""
            vm.migrated_away = False
            self.table.save(vm)
            await self._set_balloon(vm, qmp)
            return vm.status()

    async def shutdown(self, name: str, timeout_s: float) -> VmStatus:
        """ACPI power button, destroy after ``timeout_s`` (errors: see QemuDriver.shutdown)."""
        vm = self.table.get(name)
        async with vm.lock:
            self.table.require_state(vm, "shutdown", POWERED_ON)
            qemu = vm.qemu
            assert qemu is not None
            was = vm.state
            qemu.calls = CallPhase.STOPPING
            graceful = False
            try:
                qmp = await qemu.session()
                if was == "paused":
                    await qemu.own_cont(qmp)
                await qmp.execute("system_powerdown")
                vm.state = "stopping"
                graceful = qemu.watch is not None and await qemu.watch.wait(max(0.0, timeout_s))
                reason = ""
                if not graceful:
                    await qemu.terminate()
                    reason = f"the guest did not power off within {timeout_s:g}s of the ACPI power button; destroyed"
            except EngineError as exc:
                log.warning("vm %s: graceful shutdown failed (%s); destroying it", name, exc)
                await self._guarded_terminate(vm, qemu, was)
                reason = f"graceful shutdown failed ({exc}); destroyed"
            except BaseException:
                self._abandon_stop(vm, qemu, was)
                raise
            self.table.powered_off(vm, "stopped", reason)
            return vm.status()

    async def destroy(self, name: str) -> VmStatus:
        """Power a VM off at once (errors: see QemuDriver.destroy)."""
        vm = self.table.get(name)
        async with vm.lock:
            if vm.state in ("defined", "stopped"):
                return vm.status()
            if vm.qemu is not None:
                await self._guarded_terminate(vm, vm.qemu, vm.state)
            self.table.powered_off(vm, "stopped", "")
            return vm.status()

    async def pause(self, name: str) -> VmStatus:
        """QMP ``stop`` (errors: see QemuDriver.pause)."""
        vm = self.table.get(name)
        async with vm.lock:
            self.table.require_state(vm, "pause", frozenset({"running"}))
            qemu = vm.qemu
            assert qemu is not None
            await qemu.own_stop(await qemu.session())
            return self._settled(vm, qemu, "pause", "paused")

    async def resume(self, name: str) -> VmStatus:
        """QMP ``cont`` (errors: see QemuDriver.resume)."""
        vm = self.table.get(name)
        async with vm.lock:
            self.table.require_state(vm, "resume", frozenset({"paused"}))
            qemu = vm.qemu
            assert qemu is not None
            qmp = await qemu.session()
            if run_status(await qmp.execute("query-status")) == "postmigrate":
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} migrated away: its guest runs on "
                    f"{vm.migration_uri or 'another host'}, and resuming this stale copy would run it twice; "
                    "destroy and undefine it here"
                )
            await qemu.own_cont(qmp)
            return self._settled(vm, qemu, "resume", "running")

    def _settled(self, vm: Vm, qemu: QemuInstance, operation: str, state: VmPowerState) -> VmStatus:
        self.table.require_alive(vm, qemu, operation)
        vm.state = state
        vm.reason = ""
        self.table.save(vm)
        return vm.status()

    async def reboot(self, name: str) -> VmStatus:
        """QMP ``system_reset`` (errors: see QemuDriver.reboot)."""
        vm = self.table.get(name)
        async with vm.lock:
            self.table.require_state(vm, "reboot", frozenset({"running"}))
            qemu = vm.qemu
            assert qemu is not None
            await (await qemu.session()).execute("system_reset")
            self.table.require_alive(vm, qemu, "reboot")
            vm.started_at = time.time()
            self.table.save(vm)
            return vm.status()

    async def undefine(self, name: str) -> None:
        """Forget a powered-off VM and delete its directory (errors: see QemuDriver.undefine)."""
        vm = self.table.get(name)
        async with vm.lock:
            self.table.require_state(vm, "undefine", POWERED_OFF)
            try:
                await asyncio.to_thread(shutil.rmtree, vm.dir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise EngineError(
                    f"vm {name!r}: cannot remove its directory {vm.dir}: {exc.strerror or exc}; check its permissions"
                ) from exc
            self.table.vms.pop(name, None)

    async def _guarded_terminate(self, vm: Vm, qemu: QemuInstance, was: VmPowerState) -> None:
        """:meth:`QemuInstance.terminate`, but a failure or cancellation leaves the VM's record true."""
        try:
            await qemu.terminate()
        except BaseException:
            self._abandon_stop(vm, qemu, was)
            raise

    def _abandon_stop(self, vm: Vm, qemu: QemuInstance, was: VmPowerState) -> None:
        """A shutdown or destroy ended early (cancelled, or QEMU would not die): from now on an exit
        of this QEMU is news again, and one that happened meanwhile is recorded.
        """
        qemu.calls = CallPhase.IDLE
        if vm.qemu is not qemu:
            return
        if qemu.exited:
            self.table.powered_off(
                vm, "stopped", "stopped while the request to stop it was abandoned", save_errors="log"
            )
        elif vm.state == "stopping":
            vm.state = was

    async def _set_balloon(self, vm: Vm, qmp: QmpSession) -> None:
        """Ask the balloon for ``current_memory_mib``. Best effort: the VM runs either way."""
        target = vm.spec.current_memory_mib
        if not vm.spec.balloon or target is None or target >= vm.spec.memory_mib:
            return
        try:
            await qmp.execute("balloon", {"value": target * MIB})
        except EngineError as exc:
            log.warning("vm %s: could not set the balloon to %d MiB: %s", vm.name, target, exc)
