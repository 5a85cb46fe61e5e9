"""The source side of a live migration: start or re-attach, watch, steer, report.

The controller sends :class:`~protocols.messages.MigrateVm` and waits for its one reply. Meanwhile this
runner samples the engine every 20 ms, and at once when the engine has news of the migration
(:meth:`~hv.driver.Driver.migrate_wait`: QEMU's ``MIGRATION`` event), so its end is noticed when it
happens. It feeds each sample to the :class:`~protocols.migration.ConvergenceGuard`, carries out what
it asks (raise the downtime limit, switch to post-copy, abort), and reports progress about twice a
second. The engine keeps migrating while the agent is away (QEMU outlives it), so a restarted agent
that receives the same operation again attaches to the migration under way instead of starting
another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from hv.driver import Driver, HvError
from protocols.messages import MigrateVm, VmStatus
from protocols.migration import ConvergenceGuard, MigrationResult, MigrationSample, MigrationStage

log = logging.getLogger(__name__)

#: (command, stage, sample, downtime limit, note) -> None; the agent turns it into a progress message.
ProgressSink = Callable[[MigrateVm, MigrationStage, MigrationSample, int, str], None]


@dataclass(slots=True)
class MigrationOutcome:
    ok: bool
    result: MigrationResult
    status: VmStatus | None
    error: str = ""


class MigrationRunner:
    """One outgoing migration. :meth:`cancel` may be called from anywhere while :meth:`run` runs."""

    def __init__(
        self,
        driver: Driver,
        command: MigrateVm,
        progress: ProgressSink,
        *,
        sample_every_s: float = 0.02,
        report_every_s: float = 0.5,
    ) -> None:
        self.driver = driver
        self.command = command
        self.progress = progress
        self.sample_every_s = sample_every_s
        self.report_every_s = report_every_s
        self.guard = ConvergenceGuard(command.policy)
        self._cancel_reason: str | None = None
        self._wake = asyncio.Event()

    def cancel(self, reason: str) -> None:
        """Ask the migration to stop; the VM keeps running on this host. Refused once in post-copy."""
        self._cancel_reason = reason
        self._wake.set()

    async def run(self) -> MigrationOutcome:
        """Drive the migration to its end.

        Raises:
            HvError: the engine refused to start it (unknown VM, not running, disks neither shared nor
                copied); nothing was changed.
        """
        d, cmd = self.driver, self.command
        sample = await d.migrate_sample(cmd.vm)
        if sample.status in ("none", "failed", "cancelled"):
            log.info("migration of %s to %s (%s): starting", cmd.vm, cmd.dest_host, cmd.uri)
            await d.migrate_send(cmd.vm, cmd.uri, cmd.policy)
        else:
            log.info("migration of %s to %s: already %s; attaching", cmd.vm, cmd.dest_host, sample.status)
        abort_reason = ""
        last_report = float("-inf")
        while True:
            sample = await d.migrate_sample(cmd.vm)
            now = time.monotonic()
            note = ""
            if self._cancel_reason is not None and not abort_reason:
                if sample.status in ("setup", "active"):
                    abort_reason = self._cancel_reason
                    note = f"cancelling: {abort_reason}"
                    await self._abort(abort_reason)
                else:
                    log.warning("migration of %s: cannot cancel in status %s", cmd.vm, sample.status)
                    self._cancel_reason = None
            action = self.guard.observe(sample, now)
            if action.kind != "none":
                note = action.reason
                log.info("migration of %s: %s", cmd.vm, action.reason)
                if action.kind == "raise_downtime":
                    await d.migrate_tune(cmd.vm, downtime_ms=action.downtime_ms)
                elif action.kind == "postcopy":
                    await d.migrate_postcopy(cmd.vm)
                elif not abort_reason:
                    abort_reason = action.reason
                    await self._abort(abort_reason)
            ended = sample.status in ("completed", "failed", "cancelled")
            if note or ended or now - last_report >= self.report_every_s:
                self.progress(cmd, self.guard.stage, sample, self.guard.downtime_ms, note)
                last_report = now
            if sample.status == "completed":
                return MigrationOutcome(
                    ok=True,
                    result=self._result(sample),
                    status=_find(await d.list(), cmd.vm),
                )
            if sample.status in ("failed", "cancelled"):
                return await self._rolled_back(sample, abort_reason)
            await self._pause()

    async def _pause(self) -> None:
        """Until the next sample: ``sample_every_s``, or sooner when the engine reports news of the
        migration (its end, above all) or :meth:`cancel` is called.
        """
        self._wake.clear()
        waits = {
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self.driver.migrate_wait(self.command.vm, self.sample_every_s)),
        }
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            for waiting in waits:
                with contextlib.suppress(asyncio.CancelledError, HvError):
                    await waiting

    async def _abort(self, reason: str) -> None:
        try:
            await self.driver.migrate_cancel(self.command.vm)
        except HvError as exc:
            log.warning("migration of %s: cancel failed (%s); %s", self.command.vm, exc, reason)

    async def _rolled_back(self, sample: MigrationSample, abort_reason: str) -> MigrationOutcome:
        """The migration ended without the destination taking over: the VM must run here again."""
        cmd = self.command
        reason = abort_reason or sample.error or f"the migration {sample.status}"
        status: VmStatus | None
        try:
            status = await self.driver.migrate_cancel(cmd.vm)  # resumes the source if it is paused
        except HvError as exc:
            status = _find(await self.driver.list(), cmd.vm)
            reason = f"{reason}; the VM could not be resumed here: {exc}"
        log.warning(
            "migration of %s to %s failed: %s (the copy here is %s)",
            cmd.vm, cmd.dest_host, reason, status.state if status else "gone",
        )  # fmt: skip
        return MigrationOutcome(
            ok=False,
            result=self._result(sample, reason),
            status=status,
            error=f"migration of vm {cmd.vm!r} to host {cmd.dest_host!r} failed: {reason}",
        )

    def _result(self, sample: MigrationSample, reason: str = "") -> MigrationResult:
        return MigrationResult(
            status=sample.status,
            stage=self.guard.stage,
            total_ms=sample.total_ms,
            downtime_ms=sample.downtime_ms,
            transferred_bytes=sample.transferred_bytes,
            iterations=sample.iteration,
            reason=reason[:4000],  # the wire allows 4096
        )


def _find(vms: list[VmStatus], name: str) -> VmStatus | None:
    return next((vm for vm in vms if vm.name == name), None)
