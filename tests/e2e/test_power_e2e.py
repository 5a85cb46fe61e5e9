"""Power management end to end: real agent processes whose power is a real BMC each, a controller process
at ``--power-mode auto``, and ``ipmitool`` as the independent witness.

Each host's agent is the power-on command of its own ``ipmi_sim`` (see :mod:`tests.support.ipmi`): an
IPMI power-on starts ``fleetvisor agent`` and a power-off stops it, so a host in standby really has no
agent. The agents run the sim engine, whose VM load is the ``cpu_util`` of the VM's spec
(``workload``). No bus command changes a running VM's spec, so the test changes the fleet's load the
way it changes in a real fleet: busy VMs (``cpu_util`` 0.9) are deleted (load falls) and new busy VMs
arrive (load rises). The light VMs created first stay through every phase, and after each phase every
VM in the store must run on exactly one host, the one its record names.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import free_port
from tests.support.ipmi import IpmiSim, pid_alive, require_ipmi
from tests.support.processes import Proc, run_cli, wait_for

HOSTS = ("h1", "h2", "h3")
AGENT_ARGS = ("--telemetry-interval", "0.25", "--cores", "4", "--memory-mib", "8192")


@contextlib.contextmanager
def _bmcs(broker_url: str, root: Path) -> Iterator[dict[str, IpmiSim]]:
    """One ipmi_sim per host whose chassis power runs that host's agent; all powered on, then stopped."""
    require_ipmi()
    sims: dict[str, IpmiSim] = {}
    try:
        for host in HOSTS:
            command = [sys.executable, "-m", "fleetvisor", "agent", "--host-id", host, "--broker", broker_url,
                       "--state-dir", str(root / host), *AGENT_ARGS]  # fmt: skip
            sims[host] = IpmiSim(root / f"bmc-{host}", command, kill_wait_s=5)
            sims[host].start()
        for sim in sims.values():
            sim.ipmitool("chassis", "power", "on")
        yield sims
    finally:
        for sim in sims.values():
            sim.stop()


def _api(url: str, method: str, path: str, **kwargs: Any) -> Any:
    r = httpx.request(method, f"{url}/api/v1{path}", timeout=30, **kwargs)
    assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
    return r.json()


def _delete(url: str, name: str) -> None:
    """DELETE a VM; while the power manager is migrating it (409 vm_busy), wait and retry, as an operator would."""
    deadline = time.monotonic() + 30
    while True:
        r = httpx.delete(f"{url}/api/v1/vms/{name}", params={"wait": 15}, timeout=30)
        busy = r.status_code == 409 and r.json()["error"]["code"] == "vm_busy"
        if not busy or time.monotonic() > deadline:
            assert r.status_code < 300, f"DELETE /vms/{name}: {r.status_code} {r.text}"
            return
        time.sleep(0.2)


def _hosts(url: str) -> dict[str, dict[str, Any]]:
    return {h["host_id"]: h for h in _api(url, "GET", "/hosts")}


def _events(url: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in _api(url, "GET", "/events", params={"limit": 1000}) if e["type"].startswith(kind)]


def _create(url: str, name: str, cpu: float, count: int, host: str | None = None) -> None:
    body: dict[str, Any] = {"name": name, "memory_mib": 512, "count": count, "workload": {"cpu_util": cpu}}
    if host is not None:
        body["scheduling"] = {"start_on": host}
    _api(url, "POST", "/vms", json=body, params={"wait": 15})


def _no_vm_lost(url: str) -> dict[str, str]:
    """Every VM in the store runs, on exactly one host: the one its record names. Returns vm -> host."""
    vms = {v["name"]: v for v in _api(url, "GET", "/vms")}
    running: Counter[tuple[str, str]] = Counter()
    for host in _hosts(url).values():
        for vm in host["reported_vms"]:
            if vm["state"] == "running":
                running[(vm["name"], host["host_id"])] += 1
    for name, vm in vms.items():
        where = [h for (n, h) in running if n == name]
        assert vm["state"] == "running" and where == [vm["host_id"]], (
            name,
            vm["state"],
            vm["host_id"],
            where,
        )
    return {name: vm["host_id"] for name, vm in vms.items()}


def _settled(url: str) -> bool:
    vms = _api(url, "GET", "/vms")
    return all(v["state"] == "running" and v["operation"] is None for v in vms)


def _cli(url: str, *args: str) -> str:
    done = run_cli(url, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_load_falls_hosts_power_off_over_ipmi_load_rises_they_power_on_and_no_vm_is_lost(
    mosquitto, procs, tmp_path
):
    """Consolidate and power off over IPMI when load falls, power on and spread when it rises; lose no VM."""
    with _bmcs(mosquitto.url, tmp_path) as bmcs:
        secret = tmp_path / "bmc.secret"
        secret.write_text("password\n")
        config = {h: {"address": "127.0.0.1", "port": sim.port, "username": sim.username,
                      "password_file": str(secret)} for h, sim in bmcs.items()}  # fmt: skip
        (tmp_path / "bmc.json").write_text(json.dumps(config))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        controller: Proc = procs(
            "controller", "controller", "--enrolment", "open",
            "--broker", mosquitto.url, "--db", str(tmp_path / "c.sqlite"),
            "--port", str(port), "--bmc-config", str(tmp_path / "bmc.json"), "--power-mode", "auto",
            "--power-interval", "0.5", "--spare-hosts", "0", "--headroom", "0.2", "--idle-rounds", "3",
            "--power-cooldown", "2",
        )  # fmt: skip
        wait_for(
            lambda: all(h["online"] for h in _hosts(url).values()) and len(_hosts(url)) == 3,
            30,
            "three hosts online through their BMCs",
            [controller],
        )
        # Phase 0: half the fleet's CPU busy, spread over the three hosts; nothing to do.
        for host in HOSTS:
            _create(url, f"light-{host}", 0.1, 2, host)
            _create(url, f"busy-{host}", 0.9, 2, host)
        agent_pids = {host: sim.started_pids() for host, sim in bmcs.items()}
        assert all(len(pids) == 1 for pids in agent_pids.values()), agent_pids
        # The manager runs in auto mode while the VMs arrive: one may be on the move right now.
        assert len(_api(url, "GET", "/vms")) == 12
        wait_for(lambda: _settled(url), 30, "the 12 VMs running, none on the move", [controller])
        light = sorted(_api(url, "GET", "/vms"), key=lambda v: v["name"])
        assert len(light) == 12 and all(v["state"] == "running" for v in light)
        _no_vm_lost(url)

        # Phase 1: load falls. Light VMs are consolidated; the emptied hosts go to standby over IPMI.
        for vm in light:
            if vm["name"].startswith("busy-"):
                _delete(url, vm["name"])
        wait_for(
            lambda: sum(h["power_state"] == "standby" for h in _hosts(url).values()) == 2,
            30,
            "two hosts in standby",
            [controller],
        )
        hosts = _hosts(url)
        (kept,) = [h for h, view in hosts.items() if view["power_state"] == "on"]
        off = [h for h in HOSTS if h != kept]
        for host in off:
            # Marked standby first, then switched off: ipmitool, an independent client, reads it off.
            wait_for(lambda host=host: bmcs[host].power_via_ipmitool() == "off", 15, f"{host} chassis off")
            (pid,) = agent_pids[host]
            wait_for(lambda pid=pid: not pid_alive(pid), 10, f"{host}'s agent process gone")
            assert bmcs[host].started_pids() == []
            assert hosts[host]["power_method"] == "ipmi"
        wait_for(lambda: _settled(url), 15, "VMs settled")
        placed = _no_vm_lost(url)
        assert set(placed.values()) == {kept} and len(placed) == 6
        moves = [e["message"] for e in _events(url, "power.move")]
        assert moves and all(m.startswith("consolidate ") for m in moves), moves
        standby_events = [e["message"] for e in _events(url, "power.standby")]
        assert all("wake path verified (ipmi)" in m for m in standby_events), standby_events
        assert not _events(url, "host.failed") and not _events(url, "ha."), "standby is not a failure"
        shown = _cli(url, "host", "show", off[0])
        assert "power:         standby since" in shown and "via ipmi" in shown

        # Phase 2: load rises. Eight busy VMs arrive on the one host that is on: both standby hosts are
        # powered on over IPMI, their agents rejoin, and the planner spreads the VMs again.
        _create(url, "surge", 0.9, 8)
        wait_for(
            lambda: all(h["power_state"] == "on" and h["online"] for h in _hosts(url).values()),
            40,
            "standby hosts powered on and their agents back",
            [controller],
        )
        for host in off:
            assert bmcs[host].power_via_ipmitool() == "on"
        wait_for(
            lambda: _settled(url) and {v["host_id"] for v in _api(url, "GET", "/vms")} == set(HOSTS),
            40,
            "VMs spread over the three hosts",
            [controller],
        )
        placed = _no_vm_lost(url)
        assert len(placed) == 14 and set(placed.values()) == set(HOSTS)
        woken = [e["message"] for e in _events(url, "power.on")]
        assert any("via ipmi" in m for m in woken) and any("reported in" in m for m in woken), woken
        assert not _events(url, "power.alert") and not _events(url, "host.failed")
        # ipmi_sim has no DCMI power reading, so energy comes from each host's power model (and 0 W in
        # standby); the hosts that spent a while in standby used less.
        energy = {h: view["energy_kwh"] for h, view in _hosts(url).items()}
        assert all(kwh > 0 for kwh in energy.values()), energy
        assert {view["energy_source"] for view in _hosts(url).values()} == {"model"}
        assert all(energy[h] < energy[kept] for h in off), energy
        plan = json.loads(_cli(url, "plan", "--json"))
        assert plan["mode"] == "auto" and plan["powered_on_cores"] == 12
