"""A long-lived process fleet for migration fault tests, and the ground truth they check.

:class:`FaultFleet` runs Mosquitto, a controller and two qemu agents (``h1``, ``h2``) as processes,
each stopped by its PID only. A test may SIGKILL any of them and start it again on the same state
(the same store, the same agent state directory, the broker on the same port), and may hold one
still with SIGSTOP (:meth:`FaultFleet.freeze`) to keep a migration in a phase; :meth:`thaw_all` lets
them go again. The fleet outlives one test, so :meth:`FaultFleet.repair` brings back whatever a
failed test left dead or frozen.

Ground truth never comes from the controller: :func:`live_qemu_pids` reads ``/proc`` (QEMUs whose
command line names a VM's directory under a host's state directory), and :meth:`FaultFleet.reported`
reads the retained inventory an agent publishes from its own driver's list.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.support import free_port
from tests.support.brokers import MosquittoBroker
from tests.support.processes import Proc, reported_vms
from tests.support.qemu import pid_alive

HOSTS = ("h1", "h2")


def live_qemu_pids(state_dir: Path, vm: str) -> set[int]:
    """PIDs of running (not zombie) QEMUs whose command line names ``state_dir/vms/vm``."""
    needle = f"{state_dir / 'vms' / vm}/"
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu" in cmdline and needle in cmdline and pid_alive(int(entry.name)):
            found.add(int(entry.name))
    return found


def kill_pids(pids: set[int]) -> None:
    """SIGKILL ``pids`` and wait (5 s at most each) until /proc shows them gone or zombies."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def process_state(pid: int) -> str:
    """The state letter /proc gives ``pid`` (``T`` stopped, ``Z`` zombie), or ``-`` when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "-"
    return stat[stat.rindex(")") + 2]


def settle(check: Callable[[], list[str]], timeout: float, what: str, logs: Sequence[Proc]) -> None:
    """Poll ``check`` (it lists what is still wrong) until it lists nothing; bounded by ``timeout``.

    Raises:
        AssertionError: still wrong after ``timeout`` seconds; says what, and shows the logs' ends.
    """
    deadline = time.monotonic() + timeout
    problems: list[str] = ["not checked yet"]
    while time.monotonic() < deadline:
        try:
            problems = check()
        except httpx.TransportError as exc:
            problems = [f"the controller's API is not answering: {exc!r}"]
        if not problems:
            return
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.log_path.name}\n{p.output()[-2500:]}" for p in logs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {'; '.join(problems)}\n{tails}")


class FaultFleet:
    """Mosquitto, a controller and qemu agents ``h1`` and ``h2`` as processes under ``root``."""

    def __init__(self, root: Path, images: Path, mosquitto_binary: str) -> None:
        self.root = root
        self.images = images
        self.broker = MosquittoBroker(root / "mosquitto", free_port(), binary=mosquitto_binary)
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.controller: Proc | None = None
        self.agents: dict[str, Proc] = {}
        #: Every process ever started, for the logs of a failure and the final stop.
        self.started: list[Proc] = []
        self._frozen: set[int] = set()

    # -- processes ---------------------------------------------------------------------------------

    def _proc(self, name: str, *args: str) -> Proc:
        proc = Proc(list(args), self.root / f"{name}-{len(self.started)}.log")
        self.started.append(proc)
        return proc

    def start(self) -> None:
        """Start the broker, the controller and both agents; wait until both hosts are online."""
        self.broker.start()
        self.start_controller()
        for host in HOSTS:
            self.start_agent(host)
        self.wait_online()

    def start_controller(self) -> None:
        """A controller on the fleet's store and API port (a restart after a kill uses both again)."""
        self.controller = self._proc(
            "controller", "controller", "--enrolment", "open",
            "--broker", self.broker.url, "--db", str(self.root / "c.sqlite"),
            "--port", str(self.api_port), "--operation-timeout", "30",
        )  # fmt: skip

    def start_agent(self, host: str) -> None:
        """A qemu agent for ``host`` on its state directory (``root/host``)."""
        self.agents[host] = self._proc(
            host, "agent", "--host-id", host, "--broker", self.broker.url, "--state-dir", str(self.root / host),
            "--hv", "qemu", "--image-dir", str(self.images), "--telemetry-interval", "0.5",
        )  # fmt: skip

    @property
    def logs(self) -> list[Proc]:
        """The processes running now (theirs are the logs a failure shows)."""
        return [p for p in (self.controller, *self.agents.values()) if p is not None]

    def wait_online(self, timeout: float = 30) -> None:
        """Until the API answers and both hosts are online."""

        def problems() -> list[str]:
            hosts = httpx.get(f"{self.url}/api/v1/hosts", timeout=3).json()
            online = {h["host_id"] for h in hosts if h["online"]}
            return [f"{h} is not online" for h in HOSTS if h not in online]

        settle(problems, timeout, "both hosts online", self.logs)

    @staticmethod
    def _kill_proc(proc: Proc) -> None:
        os.kill(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)
        proc.stop()  # closes its log; the process is gone already

    def kill_controller(self) -> None:
        """SIGKILL the controller and reap it."""
        assert self.controller is not None
        self._frozen.discard(self.controller.popen.pid)
        self._kill_proc(self.controller)
        self.controller = None

    def kill_agent(self, host: str) -> None:
        """SIGKILL ``host``'s agent (frozen or not) and reap it; its QEMUs run on."""
        proc = self.agents.pop(host)
        self._frozen.discard(proc.popen.pid)
        self._kill_proc(proc)

    def kill_broker(self) -> None:
        """SIGKILL Mosquitto and reap it; :meth:`MosquittoBroker.start` brings it back on the same port."""
        pid = self.broker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        self.broker.kill()  # only reaps: the process is dead already

    def pid_of(self, role: str) -> int:
        """The PID of ``controller``, ``h1`` or ``h2`` (an agent)."""
        proc = self.controller if role == "controller" else self.agents[role]
        assert proc is not None
        return proc.popen.pid

    def freeze(self, role: str) -> None:
        """SIGSTOP ``role`` (see :meth:`pid_of`) and wait until /proc shows it stopped."""
        pid = self.pid_of(role)
        os.kill(pid, signal.SIGSTOP)
        self._frozen.add(pid)
        deadline = time.monotonic() + 5
        while process_state(pid) != "T":
            assert time.monotonic() < deadline, f"{role} (pid {pid}) did not stop"
            time.sleep(0.005)

    def thaw(self, role: str) -> None:
        """SIGCONT ``role``."""
        pid = self.pid_of(role)
        self._frozen.discard(pid)
        os.kill(pid, signal.SIGCONT)

    def thaw_all(self) -> None:
        """SIGCONT every process this fleet froze and that still runs."""
        for pid in sorted(self._frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen.clear()

    def repair(self) -> None:
        """Thaw what is frozen, start what is dead (broker, controller, agents), wait for both hosts."""
        self.thaw_all()
        if not self.broker.running:
            self.broker.start()
        if self.controller is None or self.controller.popen.poll() is not None:
            self.start_controller()
        for host in HOSTS:
            agent = self.agents.get(host)
            if agent is None or agent.popen.poll() is not None:
                self.start_agent(host)
        self.wait_online()

    def close(self) -> None:
        """Stop every process by its PID, then kill the QEMUs left under both state directories."""
        self.thaw_all()
        for proc in self.started:
            proc.stop()
        self.broker.stop()
        for host in HOSTS:
            for vm_dir in (self.root / host / "vms").glob("*"):
                kill_pids(live_qemu_pids(self.root / host, vm_dir.name))

    # -- ground truth -----------------------------------------------------------------------------

    def qemu_pids(self, vm: str) -> dict[str, set[int]]:
        """Running QEMUs of ``vm`` by host, from /proc."""
        return {host: live_qemu_pids(self.root / host, vm) for host in HOSTS}

    def reported(self, host: str) -> dict[str, str] | None:
        """``host``'s VMs and their states as its agent last published them from its driver (the
        retained inventory on the broker); None when the broker has none or cannot be asked.
        """
        return reported_vms(self.broker.host, self.broker.port, host)

    # -- the controller's API ---------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1{path}", params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any = None, wait: float = 0) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/api/v1{path}", json=body, params={"wait": wait}, timeout=wait + 10)
        assert r.status_code in (200, 202), f"POST {path}: {r.status_code} {r.text}"
        answer: dict[str, Any] = r.json()
        return answer

    def delete(self, path: str, wait: float = 0) -> None:
        r = httpx.delete(f"{self.url}/api/v1{path}", params={"wait": wait}, timeout=wait + 10)
        assert r.status_code in (200, 202, 404), f"DELETE {path}: {r.status_code} {r.text}"
