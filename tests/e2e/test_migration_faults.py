"""Kill -9 at every phase of a live migration, on real QEMU guests, and check that no VM is lost.

Each test migrates the tiny guest (64 MiB, dirtying 4 MiB/s) from the host the scheduler placed it
on to the other one, holds the migration in one phase, SIGKILLs one victim (the controller, the
source or destination agent, the source or destination QEMU, or Mosquitto), starts the killed
process again on the same state (the controller on the same store, an agent on the same state
directory, the broker on the same port), and waits, bounded, until the system has converged. It
then checks the invariant from ground truth:

- exactly one QEMU of the VM runs (``/proc``: a QEMU whose command line names the VM's directory
  under a host's state directory), on the expected host, and none is left on the other;
- the agents' own VM lists (the retained inventory each agent publishes from its driver) show the
  VM running there and nowhere else;
- the controller's store agrees: the record names that host, says running, holds no operation, and
  the migration operation has ended (succeeded after a switch-over, failed after a rollback).

When the killed QEMU held the guest's only copy, the guest dies with it; no migration can save it.
The test then checks the store says so (not running, no operation) and starts the VM again, as an
operator would, before checking the same invariant.

One fleet (broker, controller, two agents) serves the whole module to keep its run time short; each
test uses its own VM, and a test that fails leaves the fleet to :meth:`FaultFleet.repair`.

How each phase is reached and held
----------------------------------
- **prepare**: the destination agent is stopped (SIGSTOP) before the migration starts, so
  ``PrepareMigration`` waits unapplied while the store says ``prepare``. For the destination QEMU,
  which exists only once prepare has launched it, the controller is stopped instead between sending
  ``PrepareMigration`` and reading its reply: the incoming QEMU listens (its ``state.json`` says
  ``incoming``) and the store still says ``prepare``.
- **send**: shaped, not stopped. An 8 MiB/s bandwidth cap against a guest that dirtied 4 MiB/s
  for 2 s keeps the stream going for a second or two (it converges after three rounds); the kill
  comes as soon as the source's first progress report reached the store.
- **switch-over**: the point of no return between the stream's end and the record's move. It lasts
  milliseconds, so it is held: the source agent is stopped while the stream runs, QEMU finishes it on
  its own, and the test waits until the destination's copy runs the guest (it prints its counter
  into the destination's serial log) while the store still says ``send``.
- **finish**: ``FinishMigration`` takes a few milliseconds, so the destination agent is stopped while
  the stream runs; the test waits until the store says ``finish``. The destination's QEMU runs the
  guest meanwhile (it starts by itself when the stream ends).
- **cleanup**: ``UndefineVm`` of the source's husk takes milliseconds too: finish is held as above,
  then the source agent is stopped and the destination agent let go, until the store says
  ``cleanup``.
- **rollback**: a cancel during the send (``POST /vms/NAME/migrate/cancel``) with the destination
  agent stopped, so ``AbortMigration`` waits while the store says ``rollback``. The incoming QEMU
  has ended by itself by then (checked).

Stopped processes are let go (SIGCONT) right after the kill, before the victim is started again.
SIGSTOP holds are the deterministic approximation of a phase that lasts milliseconds: the victim dies
at a known point of the state machine instead of at a random one.

Combinations left out
---------------------
- destination QEMU in rollback: after a cancel during the send the destination QEMU exits on its
  own (QEMU ends an incoming migration whose stream broke), so there is nothing left to kill.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support import find_mosquitto
from tests.support.migration_faults import HOSTS, FaultFleet, kill_pids, settle
from tests.support.needs import need
from tests.support.qemu import counter_values, require_guests

pytestmark = pytest.mark.timeout(120)

VICTIMS = ("controller", "source_agent", "destination_agent", "source_qemu", "destination_qemu", "broker")
PHASES = ("prepare", "send", "switchover", "finish", "cleanup", "rollback")
SHORT = {
    "controller": "ctl",
    "source_agent": "srcagent",
    "destination_agent": "dstagent",
    "source_qemu": "srcqemu",
    "destination_qemu": "dstqemu",
    "broker": "broker",
}
#: Slow enough to hold the send for a second or two, fast enough that QEMU converges on its own.
POLICY = {"bandwidth_mib_s": 8, "max_downtime_ms": 500}

SKIPPED = {
    ("destination_qemu", "rollback"): (
        "after a cancel during the send the incoming QEMU exits by itself (QEMU ends an incoming "
        "migration whose stream broke), so in rollback there is no destination QEMU to kill"
    ),
}


def _cases() -> Iterator[Any]:
    for phase in PHASES:
        for victim in VICTIMS:
            reason = SKIPPED.get((victim, phase))
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            yield pytest.param(victim, phase, marks=marks, id=f"{victim}-{phase}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultFleet]:
    guests = require_guests()  # skips, or fails under CI, when QEMU or the tiny guest is missing
    binary = find_mosquitto()
    need(binary is not None, "mosquitto is not installed (apt-get install -y mosquitto)")
    need(
        shutil.which("mosquitto_sub"), "mosquitto_sub is not installed (apt-get install -y mosquitto-clients)"
    )
    assert binary is not None
    root = tmp_path_factory.mktemp("faults")
    images = root / "images"
    images.mkdir()
    shutil.copy(guests.tiny, images / "tiny.elf")
    fleet = FaultFleet(root, images, binary)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()


# -- steps ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """One test's VM and the direction of its migration (the scheduler picks the source)."""

    f: FaultFleet
    vm: str
    source: str
    dest: str


def _create(f: FaultFleet, vm: str) -> Case:
    """Create ``vm`` wherever the scheduler puts it; it migrates to the other host."""
    body = {
        "name": vm,
        "memory_mib": 64,
        "machine": "microvm",
        "boot": {"kernel": str(f.images / "tiny.elf"), "cmdline": "dirty_mib_s=4"},
        "console": False,
        "rng": False,
        "balloon": False,
    }
    answer = f.post("/vms", body, wait=30)
    source = answer["vm"]["host_id"]
    assert source in HOSTS and answer["vm"]["state"] == "running", answer
    # 2 s of dirtying: a working set that takes the stream a second or two at 8 MiB/s.
    settle(lambda: [] if len(_counts(f, source, vm)) >= 2 else ["not counting yet"], 20,
           f"vm {vm} counting on {source}", f.logs)  # fmt: skip
    return Case(f, vm, source, next(h for h in HOSTS if h != source))


def _counts(f: FaultFleet, host: str, vm: str) -> list[int]:
    try:
        return counter_values((f.root / host / "vms" / vm / "serial.log").read_text(errors="replace"))
    except OSError:
        return []


def _op(f: FaultFleet, op_id: str) -> dict[str, Any]:
    op: dict[str, Any] = f.get(f"/operations/{op_id}")
    return op


def _until_phase(f: FaultFleet, op_id: str, phase: str, timeout: float = 20) -> None:
    def problems() -> list[str]:
        op = _op(f, op_id)
        now = op["params"].get("phase")
        return [] if now == phase else [f"the operation is {op['state']} in phase {now}"]

    settle(problems, timeout, f"phase {phase}", f.logs)


def _until_sending(f: FaultFleet, op_id: str) -> None:
    def problems() -> list[str]:
        op = _op(f, op_id)
        if op["params"].get("phase") != "send" or op.get("progress") is None:
            return [f"the operation is {op['state']} in phase {op['params'].get('phase')}, no progress yet"]
        return []

    settle(problems, 20, "the stream under way", f.logs)


def _migrate(c: Case) -> str:
    op = c.f.post(f"/vms/{c.vm}/migrate", {"to": c.dest, "policy": POLICY})
    op_id: str = op["op_id"]
    return op_id


# -- holding a phase ------------------------------------------------------------------------------


def _hold_prepare(c: Case, victim: str) -> str:
    c.f.freeze(c.dest)
    op_id = _migrate(c)
    _until_phase(c.f, op_id, "prepare")
    time.sleep(0.2)  # PrepareMigration reaches the stopped agent's socket
    if victim == "destination_qemu":
        c.f.freeze("controller")
        c.f.thaw(c.dest)
        settle(lambda: [] if _incoming(c) else ["no incoming copy yet"], 20,
               f"an incoming copy of {c.vm} on {c.dest}", c.f.logs)  # fmt: skip
    return op_id


def _incoming(c: Case) -> bool:
    try:
        saved = (c.f.root / c.dest / "vms" / c.vm / "state.json").read_text()
    except OSError:
        return False
    return '"state":"incoming"' in saved and bool(c.f.qemu_pids(c.vm)[c.dest])


def _hold_send(c: Case, victim: str) -> str:
    op_id = _migrate(c)
    _until_sending(c.f, op_id)
    return op_id


def _hold_switchover(c: Case, victim: str) -> str:
    op_id = _migrate(c)
    _until_sending(c.f, op_id)
    c.f.freeze(c.source)
    settle(lambda: [] if _counts(c.f, c.dest, c.vm) else ["the destination's copy has not run yet"], 20,
           f"the stream of {c.vm} ended and its copy running on {c.dest}", c.f.logs)  # fmt: skip
    phase = _op(c.f, op_id)["params"]["phase"]
    assert phase == "send", f"the store moved on to {phase} while the source agent was stopped"
    return op_id


def _hold_finish(c: Case, victim: str) -> str:
    op_id = _migrate(c)
    _until_sending(c.f, op_id)
    c.f.freeze(c.dest)
    _until_phase(c.f, op_id, "finish")
    return op_id


def _hold_cleanup(c: Case, victim: str) -> str:
    op_id = _hold_finish(c, victim)
    c.f.freeze(c.source)
    c.f.thaw(c.dest)
    _until_phase(c.f, op_id, "cleanup")
    return op_id


def _hold_rollback(c: Case, victim: str) -> str:
    op_id = _migrate(c)
    _until_sending(c.f, op_id)
    c.f.freeze(c.dest)
    c.f.post(f"/vms/{c.vm}/migrate/cancel")
    _until_phase(c.f, op_id, "rollback")
    # What the skip of the destination QEMU in rollback rests on: it ends by itself.
    settle(lambda: [f"incoming QEMU {sorted(p)} still runs"] if (p := c.f.qemu_pids(c.vm)[c.dest]) else [],
           10, f"the incoming QEMU of {c.vm} to exit by itself", c.f.logs)  # fmt: skip
    return op_id


HOLDS: dict[str, Callable[[Case, str], str]] = {
    "prepare": _hold_prepare,
    "send": _hold_send,
    "switchover": _hold_switchover,
    "finish": _hold_finish,
    "cleanup": _hold_cleanup,
    "rollback": _hold_rollback,
}


# -- the kill and the restart ---------------------------------------------------------------------


def _role(c: Case, victim: str) -> str:
    """The host a host-side victim belongs to."""
    return c.source if victim.startswith("source") else c.dest


def _kill(c: Case, victim: str) -> None:
    if victim == "controller":
        c.f.kill_controller()
    elif victim == "broker":
        c.f.kill_broker()
    elif victim.endswith("_agent"):
        c.f.kill_agent(_role(c, victim))
    else:
        host = _role(c, victim)
        pids = c.f.qemu_pids(c.vm)[host]
        assert len(pids) == 1, f"expected one QEMU of {c.vm} on {host} to kill, found {pids}"
        kill_pids(pids)


def _restart(c: Case, victim: str) -> None:
    if victim == "controller":
        c.f.start_controller()
    elif victim == "broker":
        c.f.broker.start()
    elif victim.endswith("_agent"):
        c.f.start_agent(_role(c, victim))


# -- what the end must look like ------------------------------------------------------------------


def _outcome(c: Case, victim: str, phase: str) -> tuple[str, str, bool]:
    """Where the VM ends, how the migration ends, and whether the kill took the guest's only copy."""
    if victim == "source_qemu" and phase in ("prepare", "send", "rollback"):
        return c.source, "failed", True  # the source's copy was the guest
    if victim == "destination_qemu" and phase in ("switchover", "finish"):
        return c.dest, "failed", True  # the guest ran on the destination only; the husk is stale
    if victim == "destination_qemu" and phase == "cleanup":
        return c.dest, "succeeded", True  # the migration was over; then the guest crashed
    if phase == "rollback" or victim == "destination_qemu":
        return c.source, "failed", False
    return c.dest, "succeeded", False


def _ground_truth_problems(f: FaultFleet, vm: str, host: str, *, running: bool) -> list[str]:
    """What /proc and the agents' own lists say against one running copy on ``host`` (or none)."""
    problems = []
    pids = f.qemu_pids(vm)
    want = 1 if running else 0
    if len(pids[host]) != want:
        problems.append(f"{host} runs {len(pids[host])} QEMUs of {vm}, want {want}")
    for other in HOSTS:
        if other != host and pids[other]:
            problems.append(f"QEMU {sorted(pids[other])} of {vm} is left on {other}")
    for h in HOSTS:
        listed = f.reported(h)
        if listed is None:
            problems.append(f"no inventory from {h}")
        elif h == host and running and listed.get(vm) != "running":
            problems.append(f"{h}'s agent reports {vm} as {listed.get(vm, 'absent')}")
        elif h != host and vm in listed:
            problems.append(f"{h}'s agent still reports {vm} ({listed[vm]})")
    return problems


def _store_problems(f: FaultFleet, vm: str, op_id: str, host: str, states: tuple[str, ...]) -> list[str]:
    record = f.get(f"/vms/{vm}")
    problems = []
    if record["host_id"] != host or record["state"] not in states or record["operation"] is not None:
        problems.append(
            f"the store has {vm} on {record['host_id']}, {record['state']}, operation {record['operation']}"
        )
    op = _op(f, op_id)
    if op["state"] == "running":
        problems.append(f"the migration is still running in phase {op['params'].get('phase')}")
    return problems


def _converge(c: Case, op_id: str, victim: str, phase: str) -> None:
    f, vm = c.f, c.vm
    host, op_state, guest_died = _outcome(c, victim, phase)
    if guest_died:
        settle(
            lambda: _store_problems(f, vm, op_id, host, ("crashed", "stopped", "error"))
            + _ground_truth_problems(f, vm, host, running=False),
            60, f"{vm} recorded as down on {host}", f.logs,
        )  # fmt: skip
        f.post(f"/vms/{vm}/start", wait=30)
    settle(
        lambda: _store_problems(f, vm, op_id, host, ("running",))
        + _ground_truth_problems(f, vm, host, running=True),
        60, f"one running copy of {vm} on {host}", f.logs,
    )  # fmt: skip
    pids = f.qemu_pids(vm)
    assert len(pids[host]) == 1 and not any(pids[h] for h in HOSTS if h != host), pids
    assert f.get(f"/vms/{vm}")["host_id"] == host
    assert _op(f, op_id)["state"] == op_state, _op(f, op_id)


# -- the matrix -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("victim", "phase"), list(_cases()))
def test_kill_9_during_a_migration_phase_leaves_exactly_one_running_copy(
    fleet: FaultFleet, victim: str, phase: str
) -> None:
    """SIGKILL the victim in the phase, restart it: one QEMU runs the VM, the agents and the store agree."""
    vm = f"{SHORT[victim]}-{phase}"
    fleet.repair()
    try:
        case = _create(fleet, vm)
        op_id = HOLDS[phase](case, victim)
        _kill(case, victim)
        fleet.thaw_all()
        _restart(case, victim)
        _converge(case, op_id, victim, phase)
    finally:
        fleet.thaw_all()
        _delete(fleet, vm)


def _delete(f: FaultFleet, vm: str) -> None:
    """Delete the test's VM (best effort) and kill any QEMU of it that is left, by PID."""
    try:
        f.repair()
        f.delete(f"/vms/{vm}", wait=30)
    except (AssertionError, httpx.HTTPError) as exc:  # the test's own failure says more
        print(f"could not delete vm {vm}: {exc}")
    finally:
        for pids in f.qemu_pids(vm).values():
            kill_pids(pids)
