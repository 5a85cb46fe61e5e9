"""The client library as scripts use it, against real processes (a controller and sim agents): the
three example scripts of docs/examples run as they are, each end state checked from the API and from
what the agents report; and a script gets the same error, word for word, as the CLI prints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from controller.client import Client, NotFound
from protocols.rest import CreateVmRequest, SchedulingHints
from tests.support.processes import ROOT, reported_vms, run_cli, start_process_fleet, wait_for

EXAMPLES = ROOT / "docs" / "examples"


def _script(name: str, url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, check=False, env={**os.environ, "FLEETVISOR_URL": url},
    )  # fmt: skip


def _create(fv: Client, name: str, host: str, **labels: str) -> None:
    spec = CreateVmRequest(
        name=name, memory_mib=128, labels=labels, scheduling=SchedulingHints(start_on=host)
    )
    made = fv.vms.create(spec, wait=30)
    assert not isinstance(made, list) and made.vm.state == "running", made  # type: ignore[union-attr]


def _on_agents(broker: object, hosts: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Every copy of every VM as the agents report them, sorted: (name, host, state). A VM that runs
    twice shows twice, so comparing with the API's list catches it.
    """
    return sorted(
        (vm, host, state)
        for host in hosts
        for vm, state in (reported_vms(broker.host, broker.port, host) or {}).items()  # type: ignore[attr-defined]
    )


@pytest.mark.timeout(180)
def test_drain_rack_empties_the_rack_onto_the_other_hosts(mosquitto, procs, tmp_path: Path) -> None:
    hosts = ("h1", "h2", "h3", "h4")
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=hosts)
    with Client(fleet.url) as fv:
        for host in hosts:
            fv.hosts.update(host, labels={"rack": "1" if host in ("h1", "h2") else "2"})
        for n, host in enumerate(("h1", "h1", "h2", "h2", "h3")):
            _create(fv, f"app-{n}", host)
        dry = _script("drain_rack.py", fleet.url, "rack=1", "--dry-run")
        assert dry.returncode == 0 and "h1: 2 VM(s)" in dry.stdout, dry.stdout + dry.stderr
        assert not any(h.maintenance for h in fv.hosts.list()), "a dry run changes nothing"

        done = _script("drain_rack.py", fleet.url, "rack=1")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "rack=1: drained (2 host(s) in maintenance, 0 VM(s) left)" in done.stdout, done.stdout
        by_host = {h.host_id: h for h in fv.hosts.list()}
        assert by_host["h1"].maintenance and by_host["h2"].maintenance
        assert not by_host["h3"].maintenance and not by_host["h4"].maintenance
        placed = {vm.name: (vm.host_id, vm.state) for vm in fv.vms.list()}
    assert len(placed) == 5 and all(h in ("h3", "h4") and s == "running" for h, s in placed.values()), placed
    expected = sorted((vm, host, state) for vm, (host, state) in placed.items())
    wait_for(
        lambda: _on_agents(mosquitto, hosts) == expected, 20, "the agents report what the API does", fleet.all
    )

    again = _script("drain_rack.py", fleet.url, "rack=9")
    assert again.returncode == 1 and "no host matches 'rack=9'" in again.stderr, again.stderr


@pytest.mark.timeout(180)
def test_stop_by_label_stops_those_vms_and_no_other(mosquitto, procs, tmp_path: Path) -> None:
    hosts = ("h1", "h2")
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=hosts)
    with Client(fleet.url) as fv:
        for n in range(6):
            _create(fv, f"web-{n}", hosts[n % 2], tier="web")
        _create(fv, "db-0", "h1", tier="db")
        bad = _script("stop_by_label.py", fleet.url, "tier in (web")
        assert bad.returncode == 1 and "^" in bad.stderr, bad.stderr  # the caret under the fault

        done = _script("stop_by_label.py", fleet.url, "tier=web", "--max-parallel", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "6 VM(s): web-0" in done.stdout and "all 6 stopped" in done.stdout, done.stdout
        states = {vm.name: vm.state for vm in fv.vms.list()}
    assert states == {**{f"web-{n}": "stopped" for n in range(6)}, "db-0": "running"}, states
    wait_for(lambda: sorted((v, s) for v, _, s in _on_agents(mosquitto, hosts)) == sorted(states.items()), 20,
             "the agents report the same states, each VM once", fleet.all)  # fmt: skip


@pytest.mark.timeout(180)
def test_quarantine_reacts_to_a_host_that_drops_offline(mosquitto, procs, tmp_path: Path) -> None:
    """The agent of h2 is killed with -9: the controller sees it go offline, the event reaches the
    script's stream, and the script puts h2 in maintenance with a quarantine label. ``--since 0``:
    the stream replays what happened before it opened, so the kill cannot race the script's start.
    """
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1", "h2"))
    log = (tmp_path / "quarantine.log").open("w")
    follower = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "quarantine.py"), "--since", "0"], cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "FLEETVISOR_URL": fleet.url, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        with Client(fleet.url) as fv:
            agent = fleet.agents["h2"].popen
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait(10)
            wait_for(lambda: fv.hosts.get("h2").maintenance, 60, "h2 quarantined", fleet.all)
            h1, h2 = fv.hosts.get("h1"), fv.hosts.get("h2")
        assert h2.labels.get("quarantine", "").startswith("offline-"), h2.labels
        assert not h1.maintenance and "quarantine" not in h1.labels
        assert "h2 quarantined (in maintenance)" in (tmp_path / "quarantine.log").read_text()
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(10)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait(5)
        log.close()
    assert follower.returncode == 0


def test_a_script_gets_the_error_the_cli_prints(mosquitto, procs, tmp_path: Path) -> None:
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path)
    with Client(fleet.url) as fv, pytest.raises(NotFound) as raised:
        fv.vms.get("nope")
    shown = run_cli(fleet.url, "vm", "show", "nope")
    assert shown.returncode == 1 and shown.stderr.strip() == f"fleetvisor: {raised.value}", shown.stderr
    assert "nope" in str(raised.value)
