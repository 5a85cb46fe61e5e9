"""The CLI as a Unix tool, against real processes: Ctrl-C, broken pipes, --version, and an event
follow that outlives a controller restart. Each CLI run is its own ``fleetvisor`` process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import ROOT, run_cli, start_process_fleet, wait_for

BIG_HOST = ("--memory-mib", "262144", "--cores", "64")


def _cli(*args: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleetvisor", *args], cwd=ROOT, text=True, stderr=subprocess.PIPE, **popen
    )


def test_version_and_a_broken_pipe_end_without_a_traceback(mosquitto, procs, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fleetvisor", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("fleetvisor 0."), done
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, agent_args=BIG_HOST)
    body = {"name": "web", "memory_mib": 64, "count": 200}
    assert (
        httpx.post(f"{fleet.url}/api/v1/vms", json=body, params={"wait": 120}, timeout=180).status_code == 200
    )
    shown = subprocess.run(
        [sys.executable, "-m", "fleetvisor", "-v", "host", "list", "--url", fleet.url, "--token", "secret-t0ken"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert f"> GET {fleet.url}/api/v1/hosts" in shown.stderr and "< 200 OK (" in shown.stderr, shown.stderr
    assert "secret-t0ken" not in shown.stderr + shown.stdout
    # `vm list --json | head -c 100`: the reader leaves long before the 200 VMs (about 250 kB) are written.
    lister = _cli("vm", "list", "--json", "--url", fleet.url, stdout=subprocess.PIPE)
    head = subprocess.run(["head", "-c", "100"], stdin=lister.stdout, capture_output=True, check=False)
    assert lister.stdout is not None
    lister.stdout.close()
    _, err = lister.communicate(timeout=60)
    assert len(head.stdout) == 100
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert lister.returncode == 141, (lister.returncode, err)


@pytest.mark.timeout(150)
def test_ctrl_c_during_a_migration_says_it_goes_on_and_it_does(mosquitto, procs, tmp_path) -> None:
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1", "h2"), agent_args=BIG_HOST)
    body = {"name": "big", "memory_mib": 16384, "scheduling": {"start_on": "h1"}}  # about 14 s to send
    assert (
        httpx.post(f"{fleet.url}/api/v1/vms", json=body, params={"wait": 30}, timeout=60).status_code == 200
    )
    migrate = _cli("vm", "migrate", "big", "--to", "h2", "--bandwidth", "2000", "--url", fleet.url)

    def sending() -> bool:
        vm = httpx.get(f"{fleet.url}/api/v1/vms/big", timeout=5).json()
        return vm["state"] == "migrating"

    wait_for(sending, 30, "the migration under way", fleet.all)
    time.sleep(1.0)
    migrate.send_signal(signal.SIGINT)
    _, err = migrate.communicate(timeout=30)
    assert migrate.returncode == 130, (migrate.returncode, err)
    assert "Traceback" not in err and "goes on (operation" in err and "fleetvisor op cancel" in err, err
    assert sum("goes on" in line for line in err.splitlines()) == 1, err  # progress lines, then one line
    wait_for(
        lambda: httpx.get(f"{fleet.url}/api/v1/vms/big", timeout=5).json()["host_id"] == "h2",
        120,
        "the migration ends on h2 after the CLI left",
        fleet.all,
    )


def test_events_follow_outlives_a_controller_restart_and_ctrl_c_stops_it_in_one_line(
    mosquitto, procs, tmp_path
) -> None:
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path)
    out = tmp_path / "events.txt"
    with out.open("w") as sink:
        follow = _cli("events", "-f", "--url", fleet.url, stdout=sink)
        try:
            _follow_across_a_restart(follow, fleet, out, mosquitto, procs, tmp_path)
        finally:
            if follow.poll() is None:  # the test failed before Ctrl-C: never leave the follow running
                follow.kill()
                follow.wait(10)
    assert follow.stderr is not None
    with follow.stderr:
        err = follow.stderr.read()
    assert follow.returncode == 0, (follow.returncode, err)
    assert "Traceback" not in err and "stopped following after event #" in err, err
    assert "retrying from event #" in err and "answers again" in err, err
    seqs = [int(line.split("#")[1].split()[0]) for line in out.read_text().splitlines() if "#" in line]
    assert seqs == sorted(set(seqs)), "no event printed twice, none out of order"


def _follow_across_a_restart(
    follow: subprocess.Popen[str], fleet: Any, out: Path, mosquitto: Any, procs: Any, tmp_path: Path
) -> None:
    """Kill -9 the controller under a running follow, restart it, make an event, then Ctrl-C."""
    wait_for(lambda: "host.joined" in out.read_text(), 30, "the follow prints events", fleet.all)
    controller = fleet.controller.popen
    os.kill(controller.pid, signal.SIGKILL)
    controller.wait(10)
    again = procs(
        "controller-2", "controller", "--enrolment", "open", "--broker", mosquitto.url,
        "--db", str(tmp_path / "c.sqlite"), "--port", fleet.url.rsplit(":", 1)[1],
    )  # fmt: skip
    wait_for(
        lambda: httpx.get(f"{fleet.url}/api/v1/health", timeout=2).status_code == 200, 30, "back", [again]
    )
    body = {"name": "after", "memory_mib": 64}
    assert (
        httpx.post(f"{fleet.url}/api/v1/vms", json=body, params={"wait": 30}, timeout=60).status_code == 200
    )
    wait_for(lambda: "vm after" in out.read_text(), 30, "events after the restart are printed", [again])
    follow.send_signal(signal.SIGINT)
    follow.wait(30)


def test_dry_run_and_explain_work_with_count(mosquitto, procs, tmp_path) -> None:
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1", "h2", "h3"), agent_args=BIG_HOST)

    dry = run_cli(
        fleet.url,
        "vm",
        "create",
        "db",
        "--memory",
        "256",
        "--count",
        "3",
        "--group",
        "db",
        "--anti-affinity",
        "--dry-run",
    )
    assert dry.returncode == 0, dry.stderr
    lines = [line for line in dry.stdout.splitlines() if "would go to" in line]
    assert [line.split()[1] for line in lines] == ["db-1", "db-2", "db-3"], dry.stdout
    assert len({line.split()[-4] for line in lines}) == 3, "an anti-affinity batch plans three hosts"
    assert httpx.get(f"{fleet.url}/api/v1/vms", timeout=5).json() == [], "a dry run creates nothing"
    made = run_cli(fleet.url, "vm", "create", "web", "--memory", "256", "--count", "2", "--explain")
    assert made.returncode == 0, made.stderr
    assert "web-1:" in made.stdout and "web-2:" in made.stdout and "hosts qualify" in made.stdout, made.stdout


def test_an_operator_command_loads_no_server_code() -> None:
    """`fleetvisor vm list` is a REST client: it must not import the controller, the agent, the web
    server or numpy (they made every command take about a second to start).
    """
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fleetvisor", "vm", "list", "--url", "http://127.0.0.1:9"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]  # the controller is unreachable: exit 3
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "controller.cli.parser" in imported, "the probe reads the import log"
    heavy = sorted(m for m in imported if m.split(".")[0] in ("fastapi", "uvicorn", "numpy", "agent", "hv", "amqtt")
                   or m.startswith(("controller.daemon", "controller.services", "controller.scheduler")))  # fmt: skip
    assert heavy == [], heavy
