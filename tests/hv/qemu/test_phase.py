"""The pure transitions of hv.qemu.phase: QMP events and QEMU's exit, without a QEMU."""

from __future__ import annotations

from hv.qemu import phase
from hv.qemu.phase import CallPhase, MigrationPhase, VmFacts


def facts(**changes: object) -> VmFacts:
    base: dict[str, object] = {
        "state": "running",
        "reason": "",
        "calls": CallPhase.IDLE,
        "migration": MigrationPhase.NONE,
        "outgoing": False,
        "migration_uri": "",
        "io_error": "",
    }
    base.update(changes)
    return VmFacts(**base)  # type: ignore[arg-type]


def test_migration_phase_round_trips_its_properties() -> None:
    """Every phase is rebuilt from its own properties, and but() changes only what it is given."""
    for p in MigrationPhase:
        assert (
            MigrationPhase.of(
                migrating=p.migrating, guest_stopped=p.guest_stopped, switched_over=p.switched_over
            )
            is p
        )
    assert MigrationPhase.SWITCHED_OVER.but(migrating=False) is MigrationPhase.ENDED_STOPPED
    assert MigrationPhase.GUEST_STOPPED.but(guest_stopped=False) is MigrationPhase.SENDING


def test_an_outside_stop_is_news_and_names_the_io_error() -> None:
    """A STOP nobody asked for pauses the VM with an event; one of ours or a migration's is no news."""
    change = phase.qmp_event(facts(io_error="disk vda: nospace"), "STOP", {})
    assert (change.state, change.event, change.save) == ("paused", "paused", True)
    assert "I/O error (disk vda: nospace)" in change.reason
    own = phase.qmp_event(facts(calls=CallPhase.PAUSING), "STOP", {})
    assert (own.state, own.event, own.save) == ("running", None, False)
    migrating = phase.qmp_event(facts(migration=MigrationPhase.SENDING), "STOP", {})
    assert (migrating.state, migrating.event, migrating.migration) == (
        "paused",
        None,
        MigrationPhase.GUEST_STOPPED,
    )


def test_resume_after_a_failed_migration_is_no_news() -> None:
    """QEMU resuming a guest it stopped for the switchover runs it again without an event."""
    change = phase.qmp_event(facts(state="paused", migration=MigrationPhase.ENDED_STOPPED), "RESUME", {})
    assert (change.state, change.event, change.migration) == ("running", None, MigrationPhase.NONE)


def test_migration_events_of_a_source() -> None:
    """pre-switchover asks for the switchover; completed leaves the source paused, migrated away."""
    source = facts(outgoing=True, migration_uri="tcp:h2:4444", migration=MigrationPhase.GUEST_STOPPED)
    assert phase.qmp_event(source, "MIGRATION", {"status": "pre-switchover"}).switchover
    done = phase.qmp_event(source, "MIGRATION", {"status": "completed"})
    assert (done.state, done.migration, done.save) == ("paused", MigrationPhase.NONE, True)
    assert done.reason.startswith("migrated away to tcp:h2:4444")
    assert phase.qmp_event(facts(), "MIGRATION", {"status": "completed"}).state == "running"


def test_exit_outcomes() -> None:
    """A guest power-off is a shutdown, a panic a crash; an expected exit is not asked about."""
    clues = phase.ExitClues(shutdown_data={"reason": "guest-shutdown"})
    out = phase.exit_outcome(state="running", clues=clues, pid=7, wait_status=0)
    assert (out.event, out.state) == ("shutdown", "stopped")
    panicked = phase.exit_outcome(state="running", clues=phase.ExitClues(panicked=True), pid=7, wait_status=0)
    assert (panicked.event, panicked.state) == ("crashed", "crashed")
    incoming = phase.exit_outcome(
        state="incoming", clues=phase.ExitClues(), pid=7, wait_status=0
    )  # exited with 0
    assert (incoming.event, incoming.state) == ("stopped", "stopped")
    assert CallPhase.STOPPING.exit_expected and not CallPhase.RESUMING.exit_expected
