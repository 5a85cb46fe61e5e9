"""Live migration, source side: send, follow, tune, switch to post-copy, cancel.

:class:`MigrationSource` drives QEMU's outgoing migration of a running VM. The source keeps
sending while no agent watches, and ``state.json`` keeps the URI, so a re-sent ``migrate_send``
(a restarted agent) attaches to the migration under way. With storage copy, QEMU waits before the
switchover (``pause-before-switchover``) while :func:`~hv.qemu.storage_copy.complete_mirrors`
finishes the disks. After a completed migration the source idles ``paused`` ("migrated away")
until the agent destroys it. The migration's phase is a :class:`~hv.qemu.phase.MigrationPhase`
on the VM's QEMU.

Imports: :mod:`hv.driver` (errors), :mod:`hv.qemu.instance`, :mod:`hv.qemu.migration`,
:mod:`hv.qemu.phase`, :mod:`hv.qemu.qmp`, :mod:`hv.qemu.storage_copy`, :mod:`hv.qemu.vm_table`
and :mod:`protocols` only.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time

from hv.driver import EngineError, InvalidRequest, InvalidState
from hv.qemu import migration, storage_copy
from hv.qemu.instance import QemuInstance
from hv.qemu.migration import MIGRATING, POSTCOPY, migration_status
from hv.qemu.qmp import POLL_S, SETTLE_TIMEOUT_S, QmpSession, poll, run_status
from hv.qemu.vm_table import Vm, VmTable
from protocols.messages import VmStatus
from protocols.migration import MigrationPolicy, MigrationSample, check_policy, policy_problems
from protocols.vmspec import DiskSpec

__all__ = ["MigrationSource"]

log = logging.getLogger(__name__)

#: How long a "completed" migration may lack its total time and downtime in ``query-migrate``.
COMPLETED_FIGURES_S = 0.5
#: How long a sample waits for the verdict on a source QEMU that just exited (see vm_events).
EXIT_JUDGED_S = 2.0


class MigrationSource:
    """The outgoing migrations of one host's VMs."""

    def __init__(self, table: VmTable) -> None:
        self.table = table
        self.host_id = table.host_id

    async def send(self, name: str, uri: str, policy: MigrationPolicy) -> None:
        """Apply ``policy`` and start sending the VM to ``uri`` (errors: see QemuDriver.migrate_send)."""
        vm = self.table.get(name)
        async with vm.lock:
            qemu = vm.qemu
            if vm.state == "incoming":
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} is incoming (the destination of a migration); "
                    "migrate_send needs it running; finish that migration first (migrate_finish)"
                )
            if qemu is None:
                self.table.require_state(vm, "migrate_send", frozenset({"running"}))
            assert qemu is not None
            qmp = await qemu.session()
            if await self._follows(vm, qemu, qmp, uri):
                return
            self.table.require_state(vm, "migrate_send", frozenset({"running"}))
            target, copied = self._checked(vm, uri, policy)
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": migration.source_capabilities(policy, copy_storage=bool(copied))},
            )
            await qmp.execute("migrate-set-parameters", migration.source_parameters(policy))
            qemu.migration = qemu.migration.but(switched_over=False)
            if copied:
                await storage_copy.mirror_disks(name, qmp, target, copied, policy)
            vm.migration_uri = uri
            vm.migrated_away = False
            self.table.save(vm)
            qemu.migration = qemu.migration.but(migrating=True)
            try:
                await qmp.execute("migrate", {"uri": target.qemu_uri})
                await self._check_started(vm, qmp, uri)
            except BaseException:
                qemu.migration = qemu.migration.but(migrating=False)
                if copied and not qemu.exited:
                    with contextlib.suppress(EngineError):
                        await storage_copy.drop_mirrors(name, qmp)
                raise

    async def _follows(self, vm: Vm, qemu: QemuInstance, qmp: QmpSession, uri: str) -> bool:
        """Whether a migration to ``uri`` is under way or completed already (a re-sent call)."""
        status = await self._outgoing_status(vm, qmp)
        if status in MIGRATING or status == "completed":
            if vm.migration_uri != uri:
                raise InvalidState(
                    f"vm {vm.name!r} on host {self.host_id!r} is already migrating to {vm.migration_uri} "
                    f"(qemu: {status}), not to {uri}; cancel it first (migrate_cancel), or pass the "
                    "same URI to follow it"
                )
            qemu.migration = qemu.migration.but(migrating=status != "completed")
            return True
        if status == "cancelling":
            raise InvalidState(
                f"vm {vm.name!r} on host {self.host_id!r}: its previous migration is still being "
                "cancelled; retry in a moment"
            )
        return False

    def _checked(
        self, vm: Vm, uri: str, policy: MigrationPolicy
    ) -> tuple[migration.MigrationUri, builtins.list[DiskSpec]]:
        """The parsed URI and the disks to copy; raises InvalidRequest for bad input."""
        name = vm.name
        if problems := check_policy(policy):
            raise InvalidRequest(policy_problems(f"vm {name!r}", problems))
        target = migration.parse_uri(name, uri)
        copied = migration.copied_disks(vm.spec)
        if copied and not policy.copy_storage:
            raise InvalidRequest(migration.local_disks_message(name, copied))
        if copied and not target.has_nbd:
            raise InvalidRequest(
                f"vm {name!r}: its local disks are to be copied (copy_storage), but {uri!r} names no "
                "NBD server of the destination; pass the URI that migrate_incoming returned for this "
                "VM's spec (it exports the disks when the spec has overlay disks)"
            )
        return target, copied

    async def wait(self, name: str, timeout_s: float) -> None:
        """Return on QEMU's next ``MIGRATION`` event (one since the previous call counts), or after
        ``timeout_s``.
        """
        qemu = self.table.get(name).qemu
        if qemu is None or qemu.exited:
            await asyncio.sleep(timeout_s)
            return
        try:
            await asyncio.wait_for(qemu.migration_news.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            qemu.migration_news.clear()

    async def sample(self, name: str) -> MigrationSample:
        """The migration now (errors: see QemuDriver.migrate_sample)."""
        vm = self.table.get(name)
        qemu = vm.qemu
        if not vm.migration_uri:
            # No outgoing migration was started here. QEMU may still say "completed": that is the
            # incoming migration that brought this VM here.
            return MigrationSample(status="none")
        if qemu is not None and qemu.exited and vm.qemu is qemu:
            # Its exit is still being judged: what QEMU wrote before it died (a MIGRATION
            # "completed" event, say) is read first. Wait for that verdict.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(qemu.exit_judged.wait(), EXIT_JUDGED_S)
        if qemu is None or qemu.exited:
            if vm.migrated_away:
                # QEMU died after the migration had completed: only the husk is gone.
                return MigrationSample(status="completed")
            return MigrationSample(status="failed", error=f"the source's qemu is gone: {vm.reason}")
        qmp = await qemu.session()
        info = await qmp.execute("query-migrate")
        if isinstance(info, dict) and info.get("status") == "pre-switchover":
            try:
                await self.switchover(vm, qemu)
            except EngineError as exc:
                log.warning("vm %s: the switchover of its migration failed: %s", name, exc)
            info = await qmp.execute("query-migrate")
        # QEMU announces "completed" a moment before it has computed the total time and downtime;
        # a sample taken on that event asks again until they are there (a few milliseconds).
        settle = time.monotonic() + COMPLETED_FIGURES_S
        while (
            isinstance(info, dict)
            and info.get("status") == "completed"
            and not info.get("total-time")
            and time.monotonic() < settle
        ):
            await asyncio.sleep(0.002)
            info = await qmp.execute("query-migrate")
        sample = migration.sample_from_query(info if isinstance(info, dict) else {})
        if sample.status == "completed" and vm.migration_uri and not vm.incoming_uri:
            self.table.migrated_away(vm, qemu)
        elif sample.status in ("failed", "cancelled"):
            qemu.migration = qemu.migration.but(migrating=False)
        return sample

    async def tune(self, name: str, *, downtime_ms: int) -> None:
        """Change the allowed downtime of the running pre-copy (errors: see QemuDriver.migrate_tune)."""
        vm = self.table.get(name)
        if downtime_ms < 1:
            raise InvalidRequest(f"vm {name!r}: downtime_ms must be at least 1, got {downtime_ms}")
        _, qmp, status = await self._source_migration(vm, "migrate_tune")
        if status not in MIGRATING or status in POSTCOPY:
            raise InvalidState(
                f"vm {name!r} on host {self.host_id!r} has no pre-copy migration under way (qemu: "
                f"{status}); migrate_tune changes a running one, so start it with migrate_send first"
            )
        await qmp.execute("migrate-set-parameters", {"downtime-limit": downtime_ms})

    async def postcopy(self, name: str) -> None:
        """Switch the running migration to post-copy (errors: see QemuDriver.migrate_postcopy)."""
        vm = self.table.get(name)
        _, qmp, status = await self._source_migration(vm, "migrate_postcopy")
        if status in POSTCOPY:
            return
        if status not in MIGRATING:
            raise InvalidState(
                f"vm {name!r} on host {self.host_id!r} has no migration under way (qemu: {status}); "
                "start one with migrate_send first"
            )
        caps = await qmp.execute("query-migrate-capabilities")
        allowed = any(
            isinstance(c, dict) and c.get("capability") == "postcopy-ram" and c.get("state") is True
            for c in (caps if isinstance(caps, builtins.list) else [])
        )
        if not allowed:
            raise InvalidState(
                f"vm {name!r} on host {self.host_id!r}: its migration's policy does not allow post-copy "
                "(postcopy=False), and QEMU cannot switch without it; let it converge, or cancel it and "
                "send it again with postcopy allowed"
            )
        await qmp.execute("migrate-start-postcopy")

    async def cancel(self, name: str) -> VmStatus:
        """Cancel a pre-copy migration and make the guest run here (errors: see
        QemuDriver.migrate_cancel).
        """
        vm = self.table.get(name)
        async with vm.lock:
            qemu, qmp, status = await self._source_migration(vm, "migrate_cancel")
            if status in MIGRATING - POSTCOPY or status == "cancelling":
                with contextlib.suppress(EngineError):  # it may have ended on its own meanwhile
                    await qmp.execute("migrate_cancel")
                status = await self._wait_migration_ended(vm, qmp)
            if status == "completed":
                self.table.migrated_away(vm, qemu)
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} has already migrated to "
                    f"{vm.migration_uri or 'its destination'}: the guest runs there, so it is too late to "
                    "cancel; destroy and undefine this copy"
                )
            if status in POSTCOPY:
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} is in post-copy: the guest runs on the "
                    "destination and this host no longer holds all of its memory, so it cannot be rolled "
                    "back; wait until the migration completes"
                )
            qemu.migration = qemu.migration.but(migrating=False)
            await storage_copy.drop_mirrors(name, qmp)
            await self._ensure_running(vm, qemu, qmp)
            vm.state = "running"
            vm.reason = ""
            self.table.save(vm)
            return vm.status()

    async def switchover(self, vm: Vm, qemu: QemuInstance) -> None:
        """Source copying storage: QEMU stopped the guest and waits (``pre-switchover``). Complete
        the mirrors, then let QEMU send the device state. A mirror that failed cancels the migration
        instead: the destination would miss writes, and QEMU resumes the guest here.

        Raises:
            EngineError: QEMU refused or does not answer.
        """
        async with qemu.switchover_lock:
            if qemu.migration.switched_over or vm.qemu is not qemu or qemu.exited:
                return
            qmp = await qemu.session()
            if migration_status(await qmp.execute("query-migrate")) != "pre-switchover":
                return
            failed = await storage_copy.complete_mirrors(vm.name, qmp)
            if failed:
                log.error(
                    "vm %s: a storage mirror failed at the switchover (%s); cancelling the migration, the "
                    "guest resumes here",
                    vm.name,
                    "; ".join(failed),
                )
                await qmp.execute("migrate_cancel")
            else:
                await qmp.execute("migrate-continue", {"state": "pre-switchover"})
            qemu.migration = qemu.migration.but(switched_over=True)

    async def switchover_logged(self, vm: Vm, qemu: QemuInstance) -> None:
        """:meth:`switchover` in the background: a failure is logged."""
        try:
            await self.switchover(vm, qemu)
        except EngineError as exc:
            # migrate_sample tries again; the agent's guard aborts a migration that stays stuck.
            log.warning("vm %s: the switchover of its migration failed: %s", vm.name, exc)

    async def _check_started(self, vm: Vm, qmp: QmpSession, uri: str) -> None:
        """Wait a moment for QEMU to connect: a destination that is not listening fails here."""
        deadline = time.monotonic() + 1.0
        while True:
            info = await qmp.execute("query-migrate")
            status = migration_status(info)
            if status == "failed":
                error = info.get("error-desc", "no reason given") if isinstance(info, dict) else ""
                raise EngineError(
                    f"vm {vm.name!r}: the migration to {uri} failed at once: {error}; is the destination "
                    "waiting for it (migrate_incoming) and reachable from this host? The VM runs here"
                )
            if status != "setup" or time.monotonic() > deadline:
                return
            await asyncio.sleep(POLL_S)

    async def _wait_migration_ended(self, vm: Vm, qmp: QmpSession) -> str:
        info = await poll(
            vm.name,
            lambda: qmp.execute("query-migrate"),
            lambda i: migration_status(i) not in (MIGRATING - POSTCOPY) | {"cancelling"},
            "its migration to end after migrate_cancel",
        )
        return migration_status(info)

    async def _ensure_running(self, vm: Vm, qemu: QemuInstance, qmp: QmpSession) -> None:
        """After a cancelled or failed migration: QEMU resumes a guest it stopped for the switchover
        by itself (a moment later); a guest still stopped after that gets a ``cont``.
        """
        # Only a guest the migration stopped gets that moment: a cont racing QEMU's own restart would
        # show as a pause and a resume from outside.
        deadline = time.monotonic() + (2.0 if qemu.migration.guest_stopped else 0.0)
        while True:
            status = run_status(await qmp.execute("query-status"))
            if status == "running":
                break
            if status not in ("finish-migrate", "inmigrate") and time.monotonic() > deadline:
                await qemu.own_cont(qmp)
                break
            if time.monotonic() > deadline + SETTLE_TIMEOUT_S:
                raise EngineError(
                    f"vm {vm.name!r}: qemu stays {status} after the migration ended; destroy and start the VM"
                )
            await asyncio.sleep(POLL_S)
        qemu.migration = qemu.migration.but(guest_stopped=False)
        self.table.require_alive(vm, qemu, "migrate_cancel")

    async def _source_migration(self, vm: Vm, operation: str) -> tuple[QemuInstance, QmpSession, str]:
        """The QEMU of a migration's source, its QMP session and QEMU's migration status."""
        if vm.state == "incoming":
            raise InvalidState(
                f"vm {vm.name!r} on host {self.host_id!r} is incoming (the destination of a migration); "
                f"{operation} acts on the source; roll a destination back with destroy and undefine"
            )
        qemu = vm.qemu
        if qemu is None:
            self.table.require_state(vm, operation, frozenset({"running", "paused"}))
        assert qemu is not None
        qmp = await qemu.session()
        return qemu, qmp, await self._outgoing_status(vm, qmp)

    async def _outgoing_status(self, vm: Vm, qmp: QmpSession) -> str:
        """QEMU's status of the migration this VM sends; ``none`` when it sent none.

        Until a QEMU sends, ``query-migrate`` reports how it *arrived*: a copy that came by migration
        says ``completed`` for good. Only migrate_send sets ``migration_uri``, so without one there is
        nothing outgoing to speak of.
        """
        if not vm.migration_uri:
            return "none"
        return migration_status(await qmp.execute("query-migrate"))
