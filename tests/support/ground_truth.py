"""Ground truth for the fleet invariants: what each host really holds, and what the store records.

The controller's API serves its own view, which is what the invariants are about, so it cannot be
the judge. This module reads past it:

- a sim host's VMs from its engine's own table, ``sim-vms.json`` in the agent's state directory
  (the sim engine's "hypervisor": its VMs outlive the agent);
- a qemu host's VMs from each VM directory the engine keeps (``vms/NAME/spec.json`` and
  ``state.json``) and, for whether a guest really runs, from ``/proc``: every live process whose
  command line names ``vms/NAME/qemu.pid`` as its ``-pidfile`` is a running copy of NAME;
- the controller's store straight from its SQLite file (read-only), VMs and operations.

:func:`check_fleet` compares them and returns a :class:`Verdict`: VMs lost, VMs duplicated, records
that disagree with the hosts, operations still running, and migrations or evacuations whose outcome
does not match where their VMs are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from controller.state.reconcile import POWER_TO_VM_STATE
from hv.driver import POWERED_OFF
from hv.qemu.vm_table import SavedState
from hv.sim.state_file import STATE_FILE, SavedTable
from tests.support.qemu import pid_alive

__all__ = [
    "Copy",
    "StoredOp",
    "StoredVm",
    "Verdict",
    "check_fleet",
    "kill_qemu_processes",
    "qemu_copies",
    "qemu_processes",
    "read_store",
    "sim_copies",
]

_params = msgspec.msgpack.Decoder(dict[str, Any])


@dataclass(frozen=True, slots=True)
class Copy:
    """One copy of VM ``name`` on ``host``, in the power state the host really has it in.

    For a qemu host ``state`` follows the process: a VM whose record says it is on but whose QEMU is
    gone is ``crashed``; ``note`` says where the record and the process disagree.
    """

    host: str
    name: str
    state: str
    pids: tuple[int, ...] = ()
    note: str = ""

    def describe(self) -> str:
        pids = f", qemu pid {', '.join(map(str, self.pids))}" if self.pids else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.host} ({self.state}{pids}{note})"


def sim_copies(host: str, state_dir: Path) -> list[Copy]:
    """The VMs in a sim host's own table (its state file), in the states it saved."""
    try:
        data = (state_dir / STATE_FILE).read_bytes()
    except FileNotFoundError:
        return []
    table = msgspec.json.decode(data, type=SavedTable)
    return [Copy(host, vm.spec.name, vm.state) for vm in table.vms]


def qemu_processes(state_dir: Path) -> dict[str, list[int]]:
    """Live (not zombie) processes whose ``-pidfile`` is ``state_dir/vms/NAME/qemu.pid``, by NAME."""
    vms_dir = Path(os.path.realpath(state_dir / "vms"))
    found: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # it ended meanwhile
        args = [a.decode(errors="replace") for a in argv]
        if "-pidfile" not in args[:-1]:
            continue
        pidfile = Path(os.path.realpath(args[args.index("-pidfile") + 1]))
        pid = int(entry.name)
        if pidfile.parent.parent == vms_dir and pid_alive(pid):
            found.setdefault(pidfile.parent.name, []).append(pid)
    return found


def qemu_copies(host: str, state_dir: Path) -> list[Copy]:
    """A qemu host's VMs: each directory with a spec (as the engine loads them), and each running QEMU.

    A QEMU whose directory holds no spec is a copy too: a guest that runs although its engine has
    forgotten it.
    """
    processes = qemu_processes(state_dir)
    vms_dir = state_dir / "vms"
    names = {d.name for d in vms_dir.iterdir() if (d / "spec.json").is_file()} if vms_dir.is_dir() else set()
    copies = []
    for name in sorted(names | set(processes)):
        pids = tuple(sorted(processes.get(name, ())))
        if name not in names:
            copies.append(Copy(host, name, "running", pids, "a QEMU runs but its engine has no such VM"))
            continue
        saved = _saved_state(vms_dir / name)
        recorded = saved.state if saved is not None else "stopped"  # as the engine reads a lost state.json
        if pids and recorded in POWERED_OFF:
            copies.append(Copy(host, name, "running", pids, f"its engine records it {recorded}"))
        elif not pids and recorded not in POWERED_OFF:
            copies.append(Copy(host, name, "crashed", (), f"its engine records it {recorded}, no QEMU runs"))
        else:
            copies.append(Copy(host, name, recorded, pids))
    return copies


def _saved_state(vm_dir: Path) -> SavedState | None:
    try:
        return msgspec.json.decode((vm_dir / "state.json").read_bytes(), type=SavedState)
    except (OSError, msgspec.DecodeError):
        return None


def kill_qemu_processes(state_dir: Path) -> list[int]:
    """SIGKILL, by PID, every live QEMU whose ``-pidfile`` lies under ``state_dir/vms``; the PIDs."""
    killed = []
    for pids in qemu_processes(state_dir).values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


@dataclass(frozen=True, slots=True)
class StoredVm:
    """A VM's row in the store."""

    name: str
    host_id: str | None
    state: str
    op_id: str | None
    error: str


@dataclass(frozen=True, slots=True)
class StoredOp:
    """An operation's row in the store."""

    op_id: str
    kind: str
    vm: str
    host_id: str | None
    state: str
    error: str
    params: dict[str, Any]
    created_at: float


def read_store(db_path: Path) -> tuple[dict[str, StoredVm], dict[str, StoredOp]]:
    """The VMs (by name) and operations (by id) in the controller's SQLite file, read-only.

    Raises:
        sqlite3.Error: the file cannot be read right now (e.g. it is locked, or not created yet).
    """
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)) as db:
        vms = {
            row[0]: StoredVm(*row) for row in db.execute("SELECT name, host_id, state, op_id, error FROM vms")
        }
        ops = {
            row[0]: StoredOp(
                op_id=row[0],
                kind=row[1],
                vm=row[2],
                host_id=row[3],
                state=row[4],
                error=row[5],
                params=_params.decode(row[6]),
                created_at=row[7],
            )
            for row in db.execute(
                "SELECT op_id, kind, vm, host_id, state, error, params, created_at FROM operations"
            )
        }
    return vms, ops


@dataclass(slots=True)
class Verdict:
    """What :func:`check_fleet` found; every list holds one line per problem."""

    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    running_ops: list[str] = field(default_factory=list)
    moves: list[str] = field(default_factory=list)
    #: VMs whose place was checked against the outcome of their last migration.
    moves_checked: int = 0

    def problems(self) -> list[str]:
        return [
            *(f"lost: {p}" for p in self.lost),
            *(f"duplicated: {p}" for p in self.duplicated),
            *(f"store mismatch: {p}" for p in self.mismatches),
            *(f"still running: {p}" for p in self.running_ops),
            *(f"move: {p}" for p in self.moves),
        ]


def check_fleet(
    vms: Mapping[str, StoredVm],
    ops: Mapping[str, StoredOp],
    copies: Iterable[Copy],
    *,
    created: Collection[str] = (),
    deleted: Collection[str] = (),
    migrations: Collection[str] = (),
    evacuations: Collection[str] = (),
) -> Verdict:
    """Check the invariants of a settled fleet against the hosts' ``copies``.

    ``created`` are the VMs whose create the API accepted and ``deleted`` those a delete was sent
    for; ``migrations`` and ``evacuations`` are the operation ids the API handed out.
    """
    verdict = Verdict()
    by_name: dict[str, list[Copy]] = {}
    for copy in copies:
        by_name.setdefault(copy.name, []).append(copy)
    _check_copies(verdict, vms, by_name)
    for vm in vms.values():
        _check_record(verdict, vm, by_name.get(vm.name, []))
    for name in sorted(set(created) - set(deleted) - set(vms)):
        where = ", ".join(c.describe() for c in by_name.get(name, [])) or "no host has it"
        verdict.lost.append(
            f"{name}: its create was accepted and no delete was sent, but the store has no record ({where})"
        )
    for op in ops.values():
        if op.state == "running":
            verdict.running_ops.append(f"operation {op.op_id} ({op.kind} {op.vm or op.host_id})")
    for vm in vms.values():
        if vm.op_id is not None:
            verdict.running_ops.append(f"{vm.name} still points at operation {vm.op_id}")
    _check_migrations(verdict, vms, ops, by_name, migrations)
    _check_evacuations(verdict, ops, evacuations)
    return verdict


def _check_copies(verdict: Verdict, vms: Mapping[str, StoredVm], by_name: Mapping[str, list[Copy]]) -> None:
    for name, found in sorted(by_name.items()):
        if len(found) > 1 or any(len(c.pids) > 1 for c in found):
            verdict.duplicated.append(
                f"{name} exists {len(found)} times: {', '.join(c.describe() for c in found)}"
            )
        if name not in vms:
            verdict.mismatches.append(f"{name} is on {found[0].describe()} but the store has no record of it")
        for copy in found:
            if copy.note:
                verdict.mismatches.append(f"{name} on {copy.describe()}")


def _check_record(verdict: Verdict, vm: StoredVm, found: list[Copy]) -> None:
    if vm.state == "error" and vm.host_id is None:
        if found:  # a create that failed cleanly has no copy anywhere
            verdict.mismatches.append(
                f"{vm.name}: the store says its create failed, but it is on {found[0].describe()}"
            )
        return
    if not found:
        verdict.lost.append(f"{vm.name}: the store has it on {vm.host_id} ({vm.state}) but no host has it")
        return
    copy = next((c for c in found if c.host == vm.host_id), found[0])
    if copy.host != vm.host_id:
        verdict.mismatches.append(
            f"{vm.name}: the store has it on {vm.host_id} ({vm.state}), it is on {copy.describe()}"
        )
    elif POWER_TO_VM_STATE.get(copy.state) != vm.state:  # type: ignore[call-overload]
        verdict.mismatches.append(
            f"{vm.name}: the store says {vm.state}, {copy.describe()} says {copy.state}"
        )


def _check_migrations(
    verdict: Verdict,
    vms: Mapping[str, StoredVm],
    ops: Mapping[str, StoredOp],
    by_name: Mapping[str, list[Copy]],
    migrations: Collection[str],
) -> None:
    for op_id in migrations:
        if op_id not in ops:
            verdict.moves.append(f"migration {op_id} was accepted but the store has no record of it")
    # Where each VM ended up is decided by the last operation that placed it (create, HA restart, or
    # migration). After a migration: on its destination once the record was switched, else on its source.
    last: dict[str, StoredOp] = {}
    for op in sorted(ops.values(), key=lambda o: o.created_at):
        if op.kind in ("create", "restart", "migrate"):
            last[op.vm] = op
    for name, op in sorted(last.items()):
        vm = vms.get(name)
        if op.kind != "migrate" or vm is None or op.state == "running":
            continue
        switched = op.params.get("phase") == "cleanup"
        expected = op.params["to_host"] if switched else op.params["from_host"]
        verdict.moves_checked += 1
        hosts = sorted(c.host for c in by_name.get(name, []))
        outcome = f"migration {op.op_id} ({op.params['from_host']} -> {op.params['to_host']}, {op.state})"
        if vm.host_id != expected or hosts != [expected]:
            verdict.moves.append(
                f"{name}: after {outcome} it should be on {expected}; store {vm.host_id}, hosts {hosts}"
            )
        if op.state == "succeeded" and not switched:
            verdict.moves.append(
                f"{name}: {outcome} succeeded but never switched the record to its destination"
            )


def _check_evacuations(verdict: Verdict, ops: Mapping[str, StoredOp], evacuations: Collection[str]) -> None:
    for op_id in evacuations:
        op = ops.get(op_id)
        if op is None:
            verdict.moves.append(f"evacuation {op_id} was accepted but the store has no record of it")
            continue
        if op.state == "running":
            continue  # listed as still running
        results: dict[str, str] = op.params.get("results", {})
        unsettled = [n for n in op.params.get("vms", []) if n not in results]
        if unsettled:
            verdict.moves.append(
                f"evacuation {op_id} of {op.host_id} ended ({op.state}) without settling {unsettled}"
            )
        for name, outcome in sorted(results.items()):
            if outcome == f"moved to {op.host_id}":
                verdict.moves.append(
                    f"evacuation {op_id} of {op.host_id}: {name} 'moved' onto the host it evacuated"
                )
