"""Phases of a VM's QEMU, and the pure transitions that QMP events and QEMU's exit cause.

Three independent questions each get one enum:

- :class:`CallPhase`: which of the driver's own calls is in flight. The events such a call causes
  (an exit, a ``STOP``, a ``RESUME``, a ``RESET``) are its own outcome and not news.
- :class:`MigrationPhase`: how far an outgoing migration from this QEMU has come.
- :class:`DirtyProbe`: where telemetry's ``calc-dirty-rate`` measurement stands.

:func:`qmp_event`, :func:`migration_event`, :func:`migrated_away` and :func:`exit_outcome` are pure.
They take the VM's facts and an event, and return what changes and what to report; the caller
(:mod:`hv.qemu.vm_events`) applies that and does the I/O.

Imports: the standard library, :mod:`hv.qemu.migration` (QEMU's status sets), the pure
:func:`hv.qemu.process.describe_wait_status` and :mod:`protocols.messages` types. Nothing else.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from hv.qemu import migration
from hv.qemu.process import describe_wait_status
from protocols.messages import VmEventKind, VmPowerState

__all__ = [
    "CallPhase",
    "Change",
    "DirtyProbe",
    "ExitClues",
    "ExitOutcome",
    "MigrationPhase",
    "VmFacts",
    "exit_outcome",
    "migrated_away",
    "migration_event",
    "qmp_event",
]

#: QMP ``SHUTDOWN`` reasons that mean the guest itself powered off.
GUEST_POWEROFF = frozenset({"guest-shutdown"})

SWITCHOVER_REASON = "stopped for the switchover to the destination"


class CallPhase(enum.Enum):
    """Which of the driver's own calls on a QEMU is in flight."""

    #: None: every exit, STOP, RESUME and guest RESET is news.
    IDLE = "idle"
    #: start or migrate_incoming launches it: an exit is that call's to report.
    LAUNCHING = "launching"
    #: shutdown, destroy or the undoing of a failed migrate_incoming: the exit is ours.
    STOPPING = "stopping"
    #: The driver's own QMP ``stop`` (pause).
    PAUSING = "pausing"
    #: The driver's own QMP ``cont`` (resume, migrate_finish, rollback).
    RESUMING = "resuming"

    @property
    def exit_expected(self) -> bool:
        """Whether QEMU exiting now is the outcome of the call in flight."""
        return self in (CallPhase.LAUNCHING, CallPhase.STOPPING)

    @property
    def stop_expected(self) -> bool:
        """Whether a ``STOP`` now is the driver's own doing."""
        return self is CallPhase.PAUSING or self.exit_expected

    @property
    def resume_expected(self) -> bool:
        """Whether a ``RESUME`` now is the driver's own doing."""
        return self is CallPhase.RESUMING or self.exit_expected


class MigrationPhase(enum.Enum):
    """An outgoing migration of one QEMU, as far as the driver has seen it."""

    #: No outgoing migration under way, and the guest is not stopped by one.
    NONE = "none"
    #: Sending; the guest runs (here, or on the destination once in post-copy).
    SENDING = "sending"
    #: Sending; QEMU stopped the guest for the switchover (a STOP/RESUME that is no news).
    GUEST_STOPPED = "guest-stopped"
    #: As GUEST_STOPPED, and the storage switchover (mirrors completed, migrate-continue) is done.
    SWITCHED_OVER = "switched-over"
    #: The migration ended (failed, cancelled) while the guest was stopped for it; QEMU resumes it.
    ENDED_STOPPED = "ended-stopped"

    @property
    def migrating(self) -> bool:
        """A migration was started from this QEMU and has not failed, been cancelled or completed."""
        return self in (MigrationPhase.SENDING, MigrationPhase.GUEST_STOPPED, MigrationPhase.SWITCHED_OVER)

    @property
    def guest_stopped(self) -> bool:
        """QEMU stopped the guest for the switchover and has not resumed it."""
        return self in (
            MigrationPhase.GUEST_STOPPED,
            MigrationPhase.SWITCHED_OVER,
            MigrationPhase.ENDED_STOPPED,
        )

    @property
    def switched_over(self) -> bool:
        """The storage switchover of this migration is done (it runs once)."""
        return self is MigrationPhase.SWITCHED_OVER

    @staticmethod
    def of(*, migrating: bool, guest_stopped: bool, switched_over: bool = False) -> MigrationPhase:
        """The phase with these properties (a switchover counts only while the guest is stopped)."""
        if migrating and guest_stopped:
            return MigrationPhase.SWITCHED_OVER if switched_over else MigrationPhase.GUEST_STOPPED
        if migrating:
            return MigrationPhase.SENDING
        return MigrationPhase.ENDED_STOPPED if guest_stopped else MigrationPhase.NONE

    def but(
        self,
        *,
        migrating: bool | None = None,
        guest_stopped: bool | None = None,
        switched_over: bool | None = None,
    ) -> MigrationPhase:
        """This phase with the given properties changed."""
        return MigrationPhase.of(
            migrating=self.migrating if migrating is None else migrating,
            guest_stopped=self.guest_stopped if guest_stopped is None else guest_stopped,
            switched_over=self.switched_over if switched_over is None else switched_over,
        )


class DirtyProbe(enum.Enum):
    """Telemetry's ``calc-dirty-rate`` measurement of one QEMU."""

    IDLE = "idle"
    #: A measurement was started at the previous sample; this one reads it.
    MEASURING = "measuring"
    #: QEMU cannot measure; telemetry reports 0.0 from now on.
    UNSUPPORTED = "unsupported"


@dataclass(kw_only=True)
class ExitClues:
    """What QMP said before QEMU exited, to tell a power-off from a stop or a crash."""

    shutdown_data: Mapping[str, Any] | None = None
    panicked: bool = False
    io_error: str = ""


@dataclass(frozen=True, kw_only=True)
class VmFacts:
    """What an event transition needs to know about a VM and its QEMU."""

    state: VmPowerState
    reason: str
    calls: CallPhase
    migration: MigrationPhase
    #: This VM is the source of a migration (migrate_send gave it a URI) and no destination.
    outgoing: bool
    migration_uri: str
    io_error: str


@dataclass(frozen=True, kw_only=True)
class Change:
    """What an event changes: the VM's new facts, and the effects the caller carries out in order
    (restart time, save, event, switchover).
    """

    state: VmPowerState
    reason: str
    migration: MigrationPhase
    #: The guest (re)started now: its ``started_at`` becomes the current time.
    restarted: bool = False
    save: bool = False
    event: VmEventKind | None = None
    event_reason: str = ""
    #: Run the storage switchover in the background.
    switchover: bool = False


def unchanged(facts: VmFacts) -> Change:
    """The change that changes nothing."""
    return Change(state=facts.state, reason=facts.reason, migration=facts.migration)


def qmp_event(facts: VmFacts, name: str, data: Mapping[str, Any]) -> Change:
    """What an asynchronous QMP ``RESET``, ``STOP``, ``RESUME`` or ``MIGRATION`` event changes."""
    if name == "RESET":
        if data.get("guest") is True and not facts.calls.exit_expected:
            return replace(
                unchanged(facts),
                restarted=True,
                save=True,
                event="rebooted",
                event_reason="the guest rebooted itself",
            )
        return unchanged(facts)
    if name == "MIGRATION":
        return migration_event(facts, str(data.get("status", "")))
    if name == "STOP":
        return _stop(facts)
    if name == "RESUME":
        return _resume(facts)
    return unchanged(facts)


def _stop(facts: VmFacts) -> Change:
    if facts.state != "running":
        return unchanged(facts)
    if facts.migration.migrating:
        # QEMU stops the source for the switchover (or post-copy): that is the migration working.
        return Change(
            state="paused",
            reason=SWITCHOVER_REASON,
            migration=facts.migration.but(guest_stopped=True),
            save=True,
        )
    if facts.calls.stop_expected:
        return unchanged(facts)
    reason = (
        f"qemu paused the guest after an I/O error ({facts.io_error})"
        if facts.io_error
        else "paused outside fleetvisor"
    )
    return Change(
        state="paused",
        reason=reason,
        migration=facts.migration,
        save=True,
        event="paused",
        event_reason=reason,
    )


def _resume(facts: VmFacts) -> Change:
    if facts.state == "incoming":
        # The stream completed (or post-copy began) and QEMU started the guest here on its own.
        return Change(state="running", reason="", migration=facts.migration, save=True)
    if facts.state != "paused":
        return unchanged(facts)
    if facts.migration.guest_stopped:
        # The migration failed or was cancelled after the guest was stopped; QEMU resumed it here.
        return Change(
            state="running", reason="", migration=facts.migration.but(guest_stopped=False), save=True
        )
    if facts.calls.resume_expected:
        return unchanged(facts)
    reason = "resumed outside fleetvisor"
    return Change(
        state="running",
        reason=reason,
        migration=facts.migration,
        save=True,
        event="resumed",
        event_reason=reason,
    )


def migration_event(facts: VmFacts, status: str) -> Change:
    """QMP ``MIGRATION`` (the ``events`` capability is on at both ends) with QEMU's ``status``."""
    if not facts.outgoing:
        return unchanged(facts)  # a destination: its RESUME or exit tells
    if status == "pre-switchover":
        return replace(unchanged(facts), switchover=True)
    if status == "completed":
        return migrated_away(facts)
    if status in migration.POSTCOPY:
        # No way back: the guest runs on the destination now.
        return Change(
            state="paused" if facts.state == "running" else facts.state,
            reason=f"post-copy to {facts.migration_uri or 'the destination'}: the guest runs there now",
            migration=facts.migration.but(guest_stopped=False),
            save=True,
        )
    if status in ("failed", "cancelled"):
        return replace(unchanged(facts), migration=facts.migration.but(migrating=False))
    return unchanged(facts)


def migrated_away(facts: VmFacts) -> Change:
    """The source after a completed migration: QEMU idles in ``postmigrate``; the VM is paused."""
    reason = (
        f"migrated away to {facts.migration_uri or 'another host'}: the guest runs there now; "
        "destroy and undefine this copy"
    )
    done = MigrationPhase.NONE
    if facts.state == "paused" and facts.reason == reason:
        return Change(state=facts.state, reason=facts.reason, migration=done)
    return Change(state="paused", reason=reason, migration=done, save=True)


@dataclass(frozen=True, kw_only=True)
class ExitOutcome:
    """How an exit nobody expected is recorded and reported."""

    event: VmEventKind
    state: Literal["stopped", "crashed"]
    reason: str


def exit_outcome(*, state: VmPowerState, clues: ExitClues, pid: int, wait_status: int | None) -> ExitOutcome:
    """Why QEMU ended by itself: the guest powered off, a stop from outside, or a crash."""
    data = clues.shutdown_data or {}
    why = str(data.get("reason", ""))
    if clues.panicked:
        return ExitOutcome(event="crashed", state="crashed", reason="the guest kernel panicked")
    if state == "incoming" and wait_status is not None and os.WIFEXITED(wait_status):
        # QEMU ends an incoming migration that failed (or that the source cancelled) by exiting.
        return ExitOutcome(
            event="stopped",
            state="stopped",
            reason=(
                f"the incoming migration ended without a guest: qemu exited ({describe_wait_status(wait_status)}), "
                "as it does when the stream fails or the source cancels; destroy and undefine this copy"
            ),
        )
    if state == "incoming":
        return ExitOutcome(
            event="crashed",
            state="crashed",
            reason=(
                f"qemu (pid {pid}) died while receiving the migration: {describe_wait_status(wait_status)}; "
                "destroy and undefine this copy (the source still runs the guest)"
            ),
        )
    if why in GUEST_POWEROFF:
        return ExitOutcome(event="shutdown", state="stopped", reason="the guest powered itself off")
    if data:
        return ExitOutcome(
            event="stopped", state="stopped", reason=f"qemu shut down from outside fleetvisor ({why})"
        )
    return ExitOutcome(
        event="crashed",
        state="crashed",
        reason=f"qemu (pid {pid}) exited unexpectedly: {describe_wait_status(wait_status)}",
    )
