"""The chaos machinery's own checks: the kill plan replays from its seed, and the invariant checker
catches what it is there to catch (so a green chaos run means something).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tests.support.chaos import KINDS, kill_plan
from tests.support.ground_truth import Copy, StoredOp, StoredVm, check_fleet, qemu_copies


def vm(name: str, host: str | None, state: str = "running", op_id: str | None = None) -> StoredVm:
    return StoredVm(name=name, host_id=host, state=state, op_id=op_id, error="")


def migration(op_id: str, name: str, *, phase: str, state: str, at: float = 2.0) -> StoredOp:
    params = {"phase": phase, "from_host": "h1", "to_host": "h2"}
    return StoredOp(op_id, "migrate", name, "h1", state, "", params, at)


def test_the_kill_plan_replays_from_its_seed_and_hits_every_kind_first() -> None:
    """Two plans of one seed are equal; the first four kills are the four kinds; seeds differ."""
    first = list(itertools.islice(kill_plan(42), 30))
    assert first == list(itertools.islice(kill_plan(42), 30))
    assert sorted(k.kind for k in first[: len(KINDS)]) == sorted(KINDS)
    assert all(k.host for k in first if k.kind == "agent")
    assert first != list(itertools.islice(kill_plan(43), 30))


def test_a_clean_fleet_passes_the_check() -> None:
    """One copy per VM, on the recorded host, in the recorded state: no problem."""
    verdict = check_fleet(
        {"a": vm("a", "h1"), "b": vm("b", "q1", "crashed"), "e": vm("e", None, "error")},
        {},
        [Copy("h1", "a", "running"), Copy("q1", "b", "crashed")],
        created={"a", "b", "e"},
    )
    assert verdict.problems() == []


def test_lost_duplicated_and_mismatched_vms_are_each_caught() -> None:
    """A VM no host has, one on two hosts, one on another host and one unknown to the store are reported."""
    verdict = check_fleet(
        {
            "lost": vm("lost", "h1"),
            "dup": vm("dup", "h1"),
            "moved": vm("moved", "h1"),
            "off": vm("off", "h2"),
        },
        {},
        [
            Copy("h1", "dup", "running"),
            Copy("h2", "dup", "paused"),
            Copy("h2", "moved", "running"),
            Copy("h2", "off", "stopped"),
            Copy("h1", "stray", "running"),
        ],
        created={"gone"},
    )
    assert [p.split(":")[0] for p in verdict.lost] == ["lost", "gone"]
    assert verdict.duplicated and "dup" in verdict.duplicated[0]
    assert {p.split(":")[0].split()[0] for p in verdict.mismatches} == {"moved", "off", "stray"}


def test_operations_left_running_and_misplaced_migrations_are_caught() -> None:
    """A running operation, and a VM not where its last migration's outcome puts it, are reported."""
    ops = {
        "m1": migration("m1", "a", phase="cleanup", state="succeeded"),
        "m2": migration("m2", "b", phase="rollback", state="failed"),
        "m3": migration("m3", "c", phase="send", state="running"),
    }
    verdict = check_fleet(
        {"a": vm("a", "h1"), "b": vm("b", "h1"), "c": vm("c", "h1", "migrating", "m3")},
        ops,
        [Copy("h1", "a", "running"), Copy("h1", "b", "running"), Copy("h1", "c", "running")],
        migrations=["m1", "m2", "m3", "m4"],
    )
    assert verdict.moves_checked == 2
    assert any(p.startswith("a: after migration m1") for p in verdict.moves)
    assert not any(p.startswith("b:") for p in verdict.moves)  # rolled back: on its source, rightly
    assert any("m4" in p for p in verdict.moves)
    assert len(verdict.running_ops) == 2


def test_a_qemu_vm_is_judged_by_its_process_not_its_record(tmp_path: Path) -> None:
    """A VM recorded running with no QEMU behind it is really crashed, and says why."""
    vm_dir = tmp_path / "vms" / "g"
    vm_dir.mkdir(parents=True)
    (vm_dir / "spec.json").write_text(json.dumps({"name": "g", "memory_mib": 64}))
    (vm_dir / "state.json").write_text(json.dumps({"state": "running", "pid": 1}))
    [copy] = qemu_copies("q1", tmp_path)
    assert (copy.state, copy.pids) == ("crashed", ())
    assert "records it running" in copy.note
