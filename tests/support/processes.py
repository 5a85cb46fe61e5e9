"""Processes for end-to-end tests: ``fleetvisor`` subcommands started by a test and stopped by PID.

The ``procs`` fixture (in ``tests/e2e/conftest.py``) starts them; :func:`wait_for` polls a condition
and, when it times out, shows the end of every process's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from protocols import codec, topics
from protocols.messages import HostInventory

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    def __init__(self, args: list[str], log: Path, prefix: Sequence[str] = ()) -> None:
        """``prefix`` runs the command through another that execs it, e.g. ``ip netns exec NS``."""
        self.log_path = log
        self._log = log.open("wb")
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "fleetvisor", *args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(check: Callable[[], Any], timeout: float, what: str, proc_logs: Sequence[Proc] = ()) -> Any:
    """Poll ``check`` (HTTP errors count as not yet) until truthy; fail with the processes' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.log_path.name}\n{p.output()[-3000:]}" for p in proc_logs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


class ProcessFleet:
    """A controller and agents, each its own ``fleetvisor`` process, on one broker."""

    def __init__(self, url: str, controller: Proc, agents: dict[str, Proc]) -> None:
        self.url = url
        self.controller = controller
        self.agents = agents

    @property
    def all(self) -> list[Proc]:
        return [self.controller, *self.agents.values()]

    def hosts(self) -> list[dict[str, Any]]:
        hosts: list[dict[str, Any]] = httpx.get(f"{self.url}/api/v1/hosts", timeout=3).json()
        return hosts


def start_agent(
    procs: Callable[..., Proc], broker_url: str, root: Path, host: str, *args: str, name: str = ""
) -> Proc:
    """``fleetvisor agent`` for ``host`` with its state in ``root/host``."""
    return procs(
        name or host,
        "agent",
        "--host-id",
        host,
        "--broker",
        broker_url,
        "--state-dir",
        str(root / host),
        *args,
    )


def start_process_fleet(
    procs: Callable[..., Proc],
    broker_url: str,
    root: Path,
    hosts: Sequence[str] = ("h1",),
    controller_args: Sequence[str] = (),
    agent_args: Sequence[str] = (),
    port: int | None = None,
) -> ProcessFleet:
    """Start a controller (API on a free port, store in ``root``) and one agent per host; wait until
    every host is online.
    """
    from tests.support import free_port

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    controller = procs(
        "controller", "controller", "--enrolment", "open",
        "--broker", broker_url, "--db", str(root / "c.sqlite"), "--port", str(port),
        *controller_args,
    )  # fmt: skip
    agents = {h: start_agent(procs, broker_url, root, h, *agent_args) for h in hosts}
    fleet = ProcessFleet(url, controller, agents)
    wait_for(
        lambda: set(hosts) <= {h["host_id"] for h in fleet.hosts() if h["online"]},
        30,
        f"hosts {', '.join(hosts)} online",
        fleet.all,
    )
    return fleet


def reported_vms(broker_host: str, broker_port: int, host: str) -> dict[str, str] | None:
    """``host``'s VMs and their states as its agent last published them from its driver (the retained
    inventory on the broker, read with mosquitto_sub); None when the broker has none or cannot be asked.
    """
    topic = topics.host_topic(host, "inventory")
    try:
        done = subprocess.run(
            ["mosquitto_sub", "-h", broker_host, "-p", str(broker_port), "-t", topic,
             "-C", "1", "-W", "2", "--retained-only", "-F", "%x"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    if done.returncode != 0 or not lines:
        return None
    inventory = codec.InboundDecoder().decode(topic, bytes.fromhex(lines[0]))
    if not isinstance(inventory, HostInventory):
        return None
    return {vm.name: vm.state for vm in inventory.vms}


def run_cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real ``fleetvisor`` CLI as a child process against the controller at ``url``."""
    return subprocess.run(
        [sys.executable, "-m", "fleetvisor", *args, "--url", url],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
