"""Live migration, destination side: wait for the stream, export disks, and finish.

:class:`MigrationDestination` defines the VM and launches the same command line plus ``-incoming
defer``, in state ``incoming``, listening on a free port (``migrate-incoming``). Disks with a local
overlay get a fresh overlay on the same base image, exported writable over NBD for the source's
block mirror; such a copy starts paused (``-S``) and runs only at finish, after the exports are
gone. ``state.json`` keeps the URI handed out, so a new driver picks the migration up again. A
failed setup forgets the VM again: nothing is left behind.

Imports: :mod:`hv.driver` (errors), :mod:`hv.qemu.command_line`, :mod:`hv.qemu.errors`,
:mod:`hv.qemu.instance`, :mod:`hv.qemu.launch`, :mod:`hv.qemu.lifecycle`, :mod:`hv.qemu.migration`,
:mod:`hv.qemu.phase`, :mod:`hv.qemu.qmp`, :mod:`hv.qemu.vm_table` and :mod:`protocols` only.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence

from hv.driver import EngineError, InvalidRequest, InvalidState, VmExists
from hv.qemu import command_line, migration
from hv.qemu.errors import InvalidSpec
from hv.qemu.instance import qemu_says
from hv.qemu.launch import Launcher
from hv.qemu.lifecycle import Lifecycle
from hv.qemu.migration import migration_status
from hv.qemu.phase import CallPhase
from hv.qemu.qmp import POLL_S, QmpSession, poll, run_status
from hv.qemu.vm_table import Vm, VmTable
from protocols.messages import VmStatus
from protocols.migration import MigrationPolicy, check_policy, policy_problems
from protocols.vmspec import DiskSpec, VmSpec

__all__ = ["MigrationDestination"]

log = logging.getLogger(__name__)

#: How long migrate_finish waits for a destination that is still loading the end of its stream.
LOAD_WAIT_S = 3.0


class MigrationDestination:
    """The incoming migrations of one host."""

    def __init__(
        self, *, table: VmTable, lifecycle: Lifecycle, launcher: Launcher, start_timeout_s: float
    ) -> None:
        self.table = table
        self.lifecycle = lifecycle
        self.launcher = launcher
        self.start_timeout_s = start_timeout_s
        self.host_id = table.host_id

    async def incoming(
        self, spec: VmSpec, listen_host: str, policy: MigrationPolicy | None
    ) -> tuple[VmStatus, str]:
        """Define ``spec`` and wait for its stream (errors: see QemuDriver.migrate_incoming)."""
        self.table.require_open()
        name = spec.name
        existing = self.table.vms.get(name)
        if existing is not None:
            async with existing.lock:  # a call still launching it finishes first
                if existing.state == "incoming" and existing.incoming_uri:
                    return existing.status(), existing.incoming_uri
                state = existing.state
            raise VmExists(
                f"vm {name!r} already exists on host {self.host_id!r} (it is {state}), so a migration "
                "cannot land here; migrate to another host, or destroy and undefine the VM here first"
            )
        if policy is not None and (problems := check_policy(policy)):
            raise InvalidRequest(policy_problems(f"vm {name!r}", problems))
        copied = migration.copied_disks(spec)
        if copied and policy is not None and not policy.copy_storage:
            raise InvalidRequest(migration.local_disks_message(name, copied))
        try:
            await self.lifecycle.define(spec)
        except InvalidSpec as exc:
            raise InvalidSpec(
                f"{exc} (host {self.host_id!r} cannot receive the migration: a migrated VM needs its "
                "kernel, initrd and disk base images at the same paths on both hosts)"
            ) from None
        vm = self.table.vms[name]
        try:
            async with vm.lock:
                uri = await self._launch_incoming(vm, listen_host, policy, copied)
        except BaseException:
            # Bad input or a failed launch changes nothing: the VM is forgotten again.
            await asyncio.shield(self._forget(vm))
            raise
        return vm.status(), uri

    async def finish(self, name: str) -> VmStatus:
        """Stop the NBD exports and ``cont`` a copy that waits (errors: see QemuDriver.migrate_finish)."""
        vm = self.table.get(name)
        async with vm.lock:
            qemu = vm.qemu
            if qemu is None or qemu.exited:
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} is {vm.state} ({vm.reason or 'no reason known'}); "
                    "there is no received copy to finish; destroy and undefine it here, the guest stays on "
                    "its source"
                )
            if vm.state == "running" and not vm.incoming_uri:
                return vm.status()
            if vm.state != "incoming" and not vm.incoming_uri:
                self.table.require_state(vm, "migrate_finish", frozenset({"running"}))
            qmp = await qemu.session()
            status = await self._received(qmp)
            if status == "inmigrate":
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} is still receiving its migration (qemu: "
                    "inmigrate); call migrate_finish once the source reports the migration completed"
                )
            if vm.incoming_uri and migration.parse_uri(name, vm.incoming_uri).has_nbd:
                await self._stop_exports(vm, qmp)
            if status != "running":
                if status not in ("paused", "postmigrate", "prelaunch"):
                    raise EngineError(
                        f"vm {name!r}: qemu reports the received guest as {status}, so it cannot run; "
                        "destroy and undefine this copy, and cancel the migration on the source"
                    )
                await qemu.own_cont(qmp)
            self.table.require_alive(vm, qemu, "migrate_finish")
            vm.state = "running"
            vm.reason = ""
            vm.incoming_uri = ""
            self.table.save(vm)
            return vm.status()

    async def received(self, name: str) -> bool:
        """Whether the incoming copy of ``name`` holds the whole guest (see QemuDriver.migrate_received)."""
        vm = self.table.get(name)
        async with vm.lock:
            qemu = vm.qemu
            # The copy is the destination's until migrate_finish clears its URI, even once it runs.
            if not (vm.state == "incoming" or vm.incoming_uri) or qemu is None or qemu.exited:
                return False
            try:
                qmp = await qemu.session()
                loaded = run_status(await qmp.execute("query-status")) != "inmigrate"
                return loaded and migration_status(await qmp.execute("query-migrate")) == "completed"
            except EngineError:
                return False  # a QEMU that does not answer holds nothing anyone can run

    async def _received(self, qmp: QmpSession) -> str:
        """The destination's run state, once the stream it is reading has been loaded.

        The source reports ``completed`` when it has sent the last byte; the destination may still
        be loading the device state for a moment. While its stream is ``active`` that moment is
        waited out (at most :data:`LOAD_WAIT_S`); a copy whose stream has not even begun is not.
        """
        deadline = time.monotonic() + LOAD_WAIT_S
        while True:
            status = run_status(await qmp.execute("query-status"))
            if status != "inmigrate" or time.monotonic() > deadline:
                return status
            if migration_status(await qmp.execute("query-migrate")) not in ("active", "completed"):
                return status
            await asyncio.sleep(POLL_S)

    async def _launch_incoming(
        self,
        vm: Vm,
        listen_host: str,
        policy: MigrationPolicy | None,
        copied: Sequence[DiskSpec],
    ) -> str:
        """Launch the waiting copy; returns its URI. The caller forgets the VM if this raises."""
        plan = await self.launcher.plan(vm.spec, vm.dir)
        plan = dataclasses.replace(plan, incoming=True, start_paused=bool(copied))
        qemu = await self.lifecycle.launch(vm, plan)  # until it waits, a failure is this call's to report
        try:
            qmp = await qemu.connect(self.start_timeout_s)
            await self._incoming_capabilities(vm, qmp, policy)
            nbd_port = await self._export_disks(vm, qmp, listen_host, copied) if copied else None
            port = await self._on_free_port(
                vm,
                listen_host,
                lambda p: qmp.execute("migrate-incoming", {"uri": migration.format_uri(listen_host, p)}),
            )
        except EngineError as exc:
            raise EngineError(
                f"vm {vm.name!r} cannot wait for its migration on host {self.host_id!r}: {exc}; "
                f"{qemu_says(vm.dir)}"
            ) from exc
        qemu.calls = CallPhase.IDLE
        if qemu.exited:
            raise EngineError(
                f"vm {vm.name!r} cannot wait for its migration: qemu exited right away; {qemu_says(vm.dir)}"
            )
        uri = migration.format_uri(listen_host, port, listen_host if nbd_port else None, nbd_port)
        vm.state = "incoming"
        vm.started_at = time.time()
        vm.reason = f"waiting for the migration stream on {uri}"
        vm.incoming_uri = uri
        vm.migration_uri = ""
        vm.migrated_away = False
        self.table.save(vm)
        return uri

    async def _incoming_capabilities(self, vm: Vm, qmp: QmpSession, policy: MigrationPolicy | None) -> None:
        """Multifd and post-copy must be on at both ends before ``migrate-incoming``."""
        postcopy = policy is None or policy.postcopy
        try:
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": migration.destination_capabilities(policy, postcopy=postcopy)},
            )
        except EngineError as exc:
            if not postcopy or policy is not None:
                raise
            # The policy is unknown, so post-copy was only a maybe: a host without userfaultfd
            # still takes pre-copy.
            log.info("vm %s: this host cannot receive post-copy (%s); pre-copy only", vm.name, exc)
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": migration.destination_capabilities(policy, postcopy=False)},
            )
        if policy is not None and policy.multifd:
            await qmp.execute("migrate-set-parameters", {"multifd-channels": policy.multifd_channels})

    async def _export_disks(
        self, vm: Vm, qmp: QmpSession, listen_host: str, copied: Sequence[DiskSpec]
    ) -> int:
        """Start the NBD server on a free port; export each copied disk's fresh overlay, writable."""
        port = await self._on_free_port(
            vm,
            listen_host,
            lambda p: qmp.execute(
                "nbd-server-start", {"addr": {"type": "inet", "data": {"host": listen_host, "port": str(p)}}}
            ),
        )
        for disk in copied:
            await qmp.execute(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": migration.JOB_PREFIX + disk.target,
                    "node-name": command_line.top_node_name(disk.target),
                    "name": disk.target,
                    "writable": True,
                },
            )
        return port

    async def _on_free_port(self, vm: Vm, host_addr: str, listen: Callable[[int], Awaitable[object]]) -> int:
        """Run ``listen`` on a port that was free a moment ago; another pick if it was taken since."""
        for attempt in range(3):
            try:
                port = migration.free_port(host_addr)
            except OSError as exc:
                raise InvalidRequest(
                    f"vm {vm.name!r}: cannot listen for the migration on {host_addr!r}: "
                    f"{exc.strerror or exc}; give an address of host {self.host_id!r}"
                ) from exc
            try:
                await listen(port)
            except EngineError as exc:
                if attempt == 2 or "in use" not in str(exc).lower():
                    raise
                continue
            return port
        raise AssertionError("unreachable")

    async def _stop_exports(self, vm: Vm, qmp: QmpSession) -> None:
        """Remove the NBD exports and stop the server, before the guest may write."""
        ours = await _exports(qmp)
        for export in ours:
            with contextlib.suppress(EngineError):  # already going away
                await qmp.execute("block-export-del", {"id": export, "mode": "hard"})
        await poll(vm.name, lambda: _exports(qmp), lambda left: not left, "its NBD exports to close")
        with contextlib.suppress(EngineError):  # not running (a re-sent migrate_finish)
            await qmp.execute("nbd-server-stop")

    async def _forget(self, vm: Vm) -> None:
        """Undo a migrate_incoming that failed: kill its QEMU, remove its directory and record."""
        qemu = vm.qemu
        if qemu is not None:
            qemu.calls = CallPhase.STOPPING
            await qemu.kill(5.0)
            if qemu.qmp is not None:
                await qemu.qmp.close()
            vm.qemu = None
        await asyncio.to_thread(shutil.rmtree, vm.dir, True)
        self.table.vms.pop(vm.name, None)


async def _exports(qmp: QmpSession) -> builtins.list[str]:
    result = await qmp.execute("query-block-exports")
    return [
        str(e["id"])
        for e in (result if isinstance(result, builtins.list) else [])
        if isinstance(e, dict) and str(e.get("id", "")).startswith(migration.JOB_PREFIX)
    ]
