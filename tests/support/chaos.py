"""Chaos runs: SIGKILL the controller, agents, the broker and QEMU while VMs are created, deleted,
migrated and evacuated; then check the invariants against ground truth.

Shared by ``tests/chaos`` (a short run) and ``bench/chaos`` (minutes of it). Everything is the
product's own processes and code paths: Mosquitto with persistence, ``fleetvisor controller`` and
three ``fleetvisor agent`` processes. Hosts h1 and h2 use the sim engine, whose VMs outlive the
agent (its state file is the "hypervisor"); q1 uses the qemu engine with the project's tiny guest,
so its VMs are real QEMU processes, which are killed too. A few VMs are pinned to q1 so that TCG
does not swamp the machine; migrations and evacuations run between h1 and h2 (a migration keeps
its engine). Every process is started by this module and stopped or killed by its PID.

Replay: a run is driven by its seed (``FV_CHAOS_SEED``). The seed fixes the victims in order
(:func:`kill_plan`: one of each kind first, in a seeded order, then random ones), their pauses and
down times, and the workload's sequence of actions and random draws. Which VM an action picks
depends on the fleet at that moment, so timing can still change the targets.

After the chaos, :meth:`ChaosRun.run` waits for the fleet to settle (every host online, no
operation running in the store) and then checks :func:`tests.support.ground_truth.check_fleet`
until it holds or ``converge_s`` runs out (the store converges to what the hosts report).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from tests.support import free_port
from tests.support.brokers import MosquittoBroker
from tests.support.ground_truth import (
    Copy,
    StoredOp,
    StoredVm,
    Verdict,
    check_fleet,
    kill_qemu_processes,
    qemu_copies,
    qemu_processes,
    read_store,
    sim_copies,
)
from tests.support.processes import Proc
from tests.support.qemu import kill_qemus_under

#: The kinds of victim; every run hits each at least once.
KINDS = ("agent", "controller", "broker", "qemu")
SIM_HOSTS = ("h1", "h2")
QEMU_HOST = "q1"
HOSTS = (*SIM_HOSTS, QEMU_HOST)
#: The random kills after the first of each kind: as likely as the old uniform pick over
#: controller, broker, the three agents and a QEMU.
_LATER_KINDS = ("controller", "broker", "agent", "agent", "agent", "qemu")
#: A 64 MiB VM at 32 MiB/s takes about 2 s to move, so kills land in the middle of migrations.
SLOW_MIGRATION = {"policy": {"bandwidth_mib_s": 32}}


def seed_from_env() -> int:
    """``FV_CHAOS_SEED`` when set (a replay), else a fresh random seed."""
    given = os.environ.get("FV_CHAOS_SEED", "").strip()
    return int(given) if given else random.SystemRandom().randrange(1, 2**31)


@dataclass(frozen=True, slots=True)
class Kill:
    """One planned kill: wait ``pause_s``, kill a ``kind`` (``host``: which agent), keep it down
    ``down_s``; ``pick`` chooses among the live QEMUs (a fraction of their number).
    """

    kind: str
    host: str
    pause_s: float
    down_s: float
    pick: float

    def describe(self) -> str:
        return f"{self.kind} {self.host}".strip()


def kill_plan(seed: int) -> Iterator[Kill]:
    """The victims of a run with ``seed``, without end: each kind once in a seeded order, then random."""
    rng = random.Random(f"chaos-victims-{seed}")
    first = list(KINDS)
    rng.shuffle(first)
    n = 0
    while True:
        kind = first[n] if n < len(first) else rng.choice(_LATER_KINDS)
        host = rng.choice(HOSTS) if kind == "agent" else ""
        yield Kill(kind, host, rng.uniform(1.0, 3.0), rng.uniform(0.1, 1.5), rng.random())
        n += 1


@dataclass(frozen=True, slots=True)
class ChaosSettings:
    """How long to rage and how long to wait for calm; the fleet's shape is fixed (h1, h2, q1)."""

    seconds: float
    seed: int
    settle_s: float = 60.0
    converge_s: float = 20.0
    #: At most this many VMs on q1 at once (crashed ones count), so TCG leaves CPU for the rest.
    qemu_vms: int = 3
    #: Creates turn into deletes above this many VMs, so a long run stays the same size.
    max_vms: int = 40
    operation_timeout_s: float = 10.0
    #: A run that fails to hit a kind keeps drawing victims this long past its deadline.
    overtime_s: float = 60.0


@dataclass(slots=True)
class ChaosReport:
    """The outcome of a run: what was killed, what was asked, and what the invariant check found."""

    seed: int
    seconds: float
    kills: Counter[str] = field(default_factory=Counter)
    kills_by_victim: Counter[str] = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)
    #: Problems of the run itself (a process that died on its own, a kill that found no victim).
    incidents: list[str] = field(default_factory=list)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    migrations: list[str] = field(default_factory=list)
    evacuations: list[str] = field(default_factory=list)
    settled: bool = False
    settle_s: float = 0.0
    converge_s: float = 0.0
    verdict: Verdict = field(default_factory=Verdict)
    vms: dict[str, StoredVm] = field(default_factory=dict)
    ops: dict[str, StoredOp] = field(default_factory=dict)
    copies: list[Copy] = field(default_factory=list)

    @property
    def kinds_hit(self) -> list[str]:
        return [k for k in KINDS if self.kills[k]]

    def problems(self) -> list[str]:
        """Every invariant broken, and every incident; empty when the run was clean."""
        unsettled = (
            []
            if self.settled
            else [f"the fleet did not settle within the settle time ({self.settle_s:.0f}s)"]
        )
        return [*unsettled, *self.incidents, *self.verdict.problems()]

    def context(self) -> str:
        """The seed and the kills, for failure messages."""
        return f"seed {self.seed} (replay: FV_CHAOS_SEED={self.seed}); chaos log: {self.log}"

    def ops_by_kind(self) -> dict[str, Counter[str]]:
        table: dict[str, Counter[str]] = {}
        for op in self.ops.values():
            table.setdefault(op.kind, Counter())[op.state] += 1
        return table


class Workload:
    """Creates, deletes, migrations and evacuations through the REST API, from a thread of its own.

    Each step draws the same random numbers whatever the fleet looks like, so a seed gives the same
    sequence of actions; the VM an action names depends on the fleet at that moment.
    """

    def __init__(
        self, url: str, seed: int, kernel: Path, settings: ChaosSettings, report: ChaosReport
    ) -> None:
        self.url = url
        self.rng = random.Random(f"chaos-workload-{seed}")
        self.kernel = kernel
        self.settings = settings
        self.report = report
        self.created: set[str] = set()
        self.deleted: set[str] = set()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="chaos-workload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        self._thread.join(timeout)

    def body(self, name: str, scheduling: dict[str, Any]) -> dict[str, Any]:
        """A 64 MiB VM booting the tiny guest (the sim hosts ignore the devices)."""
        return {
            "name": name,
            "memory_mib": 64,
            "boot": {"kernel": str(self.kernel)},
            "console": False,
            "rng": False,
            "balloon": False,
            "scheduling": scheduling,
        }

    def note(self, action: str, outcome: str, name: str = "") -> None:
        with self._lock:
            self.report.requests[(action, outcome)] += 1
            if action == "create" and outcome == "accepted":
                self.created.add(name)
            if action == "delete":
                self.deleted.add(name)

    def _run(self) -> None:
        with httpx.Client(base_url=f"{self.url}/api/v1", timeout=3) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                draws = [self.rng.random() for _ in range(4)]  # the same draws whatever happens next
                try:
                    self._step(http, n, draws)
                except (httpx.HTTPError, ValueError):
                    # The controller may be down right now; that is the point.
                    self.note("request", "unanswered")
                except Exception as exc:
                    self.report.incidents.append(f"the workload stopped at step {n}: {exc!r}")
                    raise
                time.sleep(0.05)

    def _step(self, http: httpx.Client, n: int, draws: list[float]) -> None:
        roll, pick, pin, where = draws
        vms: list[dict[str, Any]] = http.get("/vms").json()
        if not self.report.evacuations and n >= 100:
            roll = 0.99  # every run evacuates at least once
        if roll < 0.55 and len(vms) < self.settings.max_vms:
            on_qemu = sum(1 for v in vms if v["host_id"] == QEMU_HOST)
            hint = (
                {"hosts": [QEMU_HOST]}
                if on_qemu < self.settings.qemu_vms and pin < 0.3
                else {"avoid_hosts": [QEMU_HOST]}
            )
            name = f"c-{n}"
            reply = http.post("/vms", json=self.body(name, hint))
            self.note("create", _outcome(reply), name)
        elif roll < 0.8:
            if vms:
                name = vms[int(pick * len(vms))]["name"]
                self.note("delete", "sent", name)
                self.note("delete", _outcome(http.delete(f"/vms/{name}")), name)
        elif roll < 0.98:
            movable = [v for v in vms if v["host_id"] in SIM_HOSTS and v["state"] == "running"]
            if movable:
                reply = http.post(
                    f"/vms/{movable[int(pick * len(movable))]['name']}/migrate", json=SLOW_MIGRATION
                )
                self.note("migrate", _outcome(reply))
                if reply.status_code == 202:
                    self.report.migrations.append(reply.json()["op_id"])
        else:
            host = SIM_HOSTS[int(where * len(SIM_HOSTS))]
            reply = http.post(f"/hosts/{host}/evacuate", json=SLOW_MIGRATION)
            self.note("evacuate", _outcome(reply))
            if reply.status_code == 202:
                self.report.evacuations.append(reply.json()["op_id"])


def _outcome(reply: httpx.Response) -> str:
    """``accepted``, or ``refused STATUS CODE`` with the API's error code (``vm_busy``...)."""
    if reply.is_success:
        return "accepted"
    try:
        code = reply.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = ""
    return f"refused {reply.status_code} {code}".strip()


class ChaosRun:
    """A fleet of real processes in ``workdir`` on ``broker``, and the chaos against it.

    Use it as a context manager: leaving it stops every process it started, by PID, and kills the
    QEMUs of q1 (guests outlive their agent by design). The caller owns ``broker``.
    """

    def __init__(
        self,
        settings: ChaosSettings,
        workdir: Path,
        broker: MosquittoBroker,
        tiny_guest: Path,
        echo: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.settings = settings
        self.workdir = workdir
        self.broker = broker
        self.echo = echo
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_path = workdir / "c.sqlite"
        self.images = workdir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.kernel = self.images / "tiny.elf"
        self.kernel.write_bytes(tiny_guest.read_bytes())
        self.report = ChaosReport(seed=settings.seed, seconds=settings.seconds)
        self.workload = Workload(self.url, settings.seed, self.kernel, settings, self.report)
        self.procs: dict[str, Proc] = {}
        self._all_procs: list[Proc] = []
        self._generation = Counter[str]()
        self._pinned = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.workload.join(10)
        for proc in self._all_procs:
            proc.stop()
        kill_qemus_under(self.state_dir(QEMU_HOST))
        kill_qemu_processes(self.state_dir(QEMU_HOST))  # any the engine had no record of

    def state_dir(self, host: str) -> Path:
        return self.workdir / host

    # ---------------------------------------------------------------------------------------------
    # Processes
    # ---------------------------------------------------------------------------------------------

    def _spawn(self, key: str, *args: str) -> Proc:
        self._generation[key] += 1
        proc = Proc(list(args), self.workdir / f"{key}-{self._generation[key]}.log")
        self._all_procs.append(proc)
        self.procs[key] = proc
        return proc

    def start_controller(self) -> Proc:
        return self._spawn(
            "controller", "controller", "--enrolment", "open", "--broker", self.broker.url, "--db", str(self.db_path),
            "--port", str(self.port), "--operation-timeout", f"{self.settings.operation_timeout_s:g}",
        )  # fmt: skip

    def start_agent(self, host: str) -> Proc:
        engine = ("--hv", "qemu", "--image-dir", str(self.images)) if host == QEMU_HOST else ()
        return self._spawn(
            host, "agent", "--host-id", host, "--broker", self.broker.url, "--state-dir", str(self.state_dir(host)),
            "--memory-mib", "16384", "--telemetry-interval", "0.5", *engine,
        )  # fmt: skip

    def start(self) -> None:
        """Start the controller and the agents; wait until every host is online.

        Raises:
            AssertionError: not every host came online within 60 s (the processes' logs attached).
        """
        self.start_controller()
        for host in HOSTS:
            self.start_agent(host)
        self._wait(lambda: self._hosts_online(), 60, "every host online")

    def log_tails(self, chars: int = 3000) -> str:
        """The end of each current process's log, for failure messages."""
        return "\n".join(f"--- {p.log_path.name}\n{p.output()[-chars:]}" for p in self.procs.values())

    def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.log_tails()}")
            time.sleep(0.1)

    def _hosts_online(self) -> bool:
        try:
            hosts = httpx.get(f"{self.url}/api/v1/hosts", timeout=3).json()
        except (httpx.HTTPError, ValueError):
            return False
        return {h["host_id"] for h in hosts if h["online"]} >= set(HOSTS)

    # ---------------------------------------------------------------------------------------------
    # The run
    # ---------------------------------------------------------------------------------------------

    def run(self) -> ChaosReport:
        """Start the fleet, rage for ``seconds``, settle, and check; the report says what happened."""
        seed = self.settings.seed
        self.echo(f"chaos seed {seed} (replay: FV_CHAOS_SEED={seed}), {self.settings.seconds:g}s of chaos")
        self.start()
        started = time.monotonic()
        self.workload.start()
        try:
            self._rage(started)
        finally:
            self.workload.join(10)
        self._settle()
        self._converge()
        return self.report

    def _rage(self, started: float) -> None:
        deadline = started + self.settings.seconds
        for kill in kill_plan(self.settings.seed):
            now = time.monotonic()
            every_kind = set(self.report.kinds_hit) == set(KINDS)
            if now >= deadline and (every_kind or now >= deadline + self.settings.overtime_s):
                return
            time.sleep(kill.pause_s)
            hit = self._kill(kill)
            line = f"{time.monotonic() - started:6.1f}s kill {kill.describe()}: {hit or 'no victim'}"
            self.report.log.append(line)
            self.echo(line)
            if hit:
                self.report.kills[kill.kind] += 1
                self.report.kills_by_victim[kill.host or kill.kind] += 1

    def _kill(self, kill: Kill) -> str | None:
        """SIGKILL the victim by PID and bring it back after ``down_s``; what was hit, or None."""
        if kill.kind == "qemu":
            return self._kill_qemu(kill.pick)
        if kill.kind == "broker":
            pid = self.broker.pid
            self.broker.restart(kill=True, down_s=kill.down_s)
            return f"mosquitto pid {pid}"
        key = kill.host or "controller"
        proc = self.procs[key]
        pid = proc.popen.pid
        hit: str | None = f"pid {pid}"
        if proc.popen.poll() is not None:
            self.report.incidents.append(
                f"{key} (pid {pid}) had exited by itself (status {proc.popen.returncode})"
            )
            hit = None
        else:
            os.kill(pid, signal.SIGKILL)
            proc.popen.wait(5)
        proc.stop()  # closes its log
        time.sleep(kill.down_s)
        if key == "controller":
            self.start_controller()
        else:
            self.start_agent(key)
        return hit

    def _kill_qemu(self, pick: float) -> str | None:
        live = self._live_qemus()
        if not live:
            self.report.incidents.append(
                "a QEMU kill found no QEMU running, even after creating a guest on q1"
            )
            return None
        name, pid = live[int(pick * len(live))]
        os.kill(pid, signal.SIGKILL)
        return f"{name} (qemu pid {pid})"

    def _live_qemus(self, timeout: float = 30.0) -> list[tuple[str, int]]:
        """The QEMUs running on q1 (name, pid); when none does, create a guest pinned there first."""
        deadline = time.monotonic() + timeout
        name = ""
        with httpx.Client(base_url=f"{self.url}/api/v1", timeout=3) as http:
            while True:
                live = sorted(
                    (n, pid) for n, pids in qemu_processes(self.state_dir(QEMU_HOST)).items() for pid in pids
                )
                if live or time.monotonic() > deadline:
                    return live
                with contextlib.suppress(httpx.HTTPError, ValueError):  # the controller may be restarting
                    name = self._pin_a_guest(http, name)
                time.sleep(0.3)

    def _pin_a_guest(self, http: httpx.Client, name: str) -> str:
        """Ask for a guest on q1 (a new one when the last one ``name`` failed); the name asked for."""
        if name:
            reply = http.get(f"/vms/{name}")
            if reply.status_code == 404 or reply.json().get("state") not in ("error", "crashed", "stopped"):
                return name  # still coming up (or the reply to its create was lost)
        self._pinned += 1
        name = f"q-{self._pinned}"
        reply = http.post("/vms", json=self.workload.body(name, {"hosts": [QEMU_HOST]}))
        self.workload.note("create", _outcome(reply), name)
        return name

    # ---------------------------------------------------------------------------------------------
    # Settling and checking
    # ---------------------------------------------------------------------------------------------

    def _settle(self) -> None:
        """Wait until every host is online and the store runs no operation (up to ``settle_s``)."""
        start = time.monotonic()
        deadline = start + self.settings.settle_s
        while time.monotonic() < deadline and not (self._hosts_online() and self._store_idle()):
            time.sleep(0.2)
        self.report.settled = time.monotonic() < deadline
        self.report.settle_s = time.monotonic() - start

    def _store_idle(self) -> bool:
        try:
            vms, ops = read_store(self.db_path)
        except sqlite3.Error:
            return False
        return all(o.state != "running" for o in ops.values()) and all(v.op_id is None for v in vms.values())

    def ground_truth(self) -> list[Copy]:
        """Every VM copy the hosts really hold (engine files and /proc), all hosts."""
        copies = [c for host in SIM_HOSTS for c in sim_copies(host, self.state_dir(host))]
        return copies + qemu_copies(QEMU_HOST, self.state_dir(QEMU_HOST))

    def _converge(self) -> None:
        """Check the invariants until they hold or ``converge_s`` passes; the last check is the report's."""
        start = time.monotonic()
        report = self.report
        while True:
            try:
                report.copies = self.ground_truth()
                report.vms, report.ops = read_store(self.db_path)
            except sqlite3.Error as exc:
                report.verdict = Verdict(mismatches=[f"the store cannot be read: {exc}"])
            else:
                report.verdict = check_fleet(
                    report.vms,
                    report.ops,
                    report.copies,
                    created=set(self.workload.created),
                    deleted=set(self.workload.deleted),
                    migrations=report.migrations,
                    evacuations=report.evacuations,
                )
            report.converge_s = time.monotonic() - start
            if not report.verdict.problems() or report.converge_s > self.settings.converge_s:
                return
            time.sleep(0.5)
