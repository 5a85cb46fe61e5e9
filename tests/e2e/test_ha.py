"""HA with real processes: kill -9 a host's agent, watch it fail, get fenced, and its HA VMs restart once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx

from tests.support.processes import start_agent, start_process_fleet, wait_for


def _start_fleet(procs: Any, mosquitto: Any, tmp_path: Any, *extra: str) -> tuple[str, dict[str, Any], Any]:
    fleet = start_process_fleet(
        procs,
        mosquitto.url,
        tmp_path,
        hosts=("h1", "h2", "h3"),
        controller_args=extra,
        agent_args=AGENT_ARGS,
    )
    return fleet.url, fleet.agents, fleet.controller


AGENT_ARGS = ("--telemetry-interval", "0.25", "--memory-mib", "8192")


def _hosts(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/api/v1/hosts", timeout=2).json()  # type: ignore[no-any-return]


def _vms(url: str) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in httpx.get(f"{url}/api/v1/vms", timeout=2).json()}


def _events(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/api/v1/events", params={"limit": 1000}, timeout=2).json()  # type: ignore[no-any-return]


def _create(url: str, name: str, **spec: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/api/v1/vms", json={"name": name, "memory_mib": 512, **spec}, params={"wait": 10}, timeout=15
    )
    assert r.status_code == 200, r.text
    return r.json()["vm"]  # type: ignore[no-any-return]


def test_killed_host_is_detected_fenced_and_its_ha_vms_restart_elsewhere_exactly_once(
    mosquitto, procs, tmp_path
):
    """Kill -9 an agent: it is suspected, then failed, then fenced; HA VMs run elsewhere by priority, once."""
    url, agents, _ = _start_fleet(
        procs, mosquitto, tmp_path, "--ha-fencing", "process", "--fence-dir", str(tmp_path)
    )
    victim = _create(url, "db-1", ha=True, ha_priority=10)["host_id"]
    for name, spec in (("web-1", {"ha": True, "ha_priority": 1}), ("batch-1", {})):
        assert _create(url, name, **spec)["host_id"] == victim  # best fit packs them together

    os.kill(agents[victim].popen.pid, signal.SIGKILL)
    agents[victim].popen.wait(5)

    # How fast detection and restart are is bench/ha's number (detect_s, restart_s). This test checks
    # the order of the steps and the end state; its bounds only stop a hung run, at ten times the 3 s
    # and 8 s it once asserted, so a loaded 2-core CI machine cannot turn slowness into a failure.
    # Failed, then fenced (a fenced host reads as fenced): either says the host was declared failed.
    wait_for(
        lambda: any(h["host_id"] == victim and h["health"] in ("failed", "fenced") for h in _hosts(url)),
        30.0,
        "failed",
    )
    wait_for(
        lambda: all(
            v["state"] == "running" and v["host_id"] != victim for n, v in _vms(url).items() if n != "batch-1"
        ),
        80.0,
        "HA VMs running elsewhere",
    )
    vms = _vms(url)
    assert vms["batch-1"]["host_id"] == victim, "a VM without HA stays where it was"
    events = _events(url)
    kinds = [e["type"] for e in events if e["host_id"] == victim or e["vm"] in vms]
    assert kinds.index("host.suspect") < kinds.index("host.failed") < kinds.index("ha.fenced")
    restarts = [e["vm"] for e in events if e["type"] == "ha.restarting"]
    assert restarts == ["db-1", "web-1"], "highest priority first"

    # The fenced host comes back: its guests died with it, and it must not run them again.
    agents[victim] = start_agent(procs, mosquitto.url, tmp_path, victim, *AGENT_ARGS, name=f"{victim}-again")

    def reported() -> Counter[str]:
        running = Counter()
        for host in _hosts(url):
            for vm in host["reported_vms"]:
                if vm["state"] == "running":
                    running[vm["name"]] += 1
        return running

    wait_for(
        lambda: any(h["host_id"] == victim and h["online"] for h in _hosts(url)), 15, "victim back online"
    )
    wait_for(
        lambda: (
            not any(
                vm["name"] in ("db-1", "web-1")
                for h in _hosts(url)
                if h["host_id"] == victim
                for vm in h["reported_vms"]
            )
        ),
        10,
        "stale copies undefined on the old host",
    )
    counts = reported()
    assert counts["db-1"] == 1 and counts["web-1"] == 1, counts
    assert any(e["type"] == "ha.stale_copy" for e in _events(url))


def test_without_fencing_nothing_is_restarted_and_an_alert_says_why(mosquitto, procs, tmp_path):
    """Without a fence a failed host's HA VMs stay put, and ha.fence_failed explains it."""
    url, agents, _ = _start_fleet(procs, mosquitto, tmp_path)  # no --ha-fencing: none
    victim = _create(url, "guarded", ha=True)["host_id"]
    os.kill(agents[victim].popen.pid, signal.SIGKILL)
    alert = wait_for(
        lambda: next((e for e in _events(url) if e["type"] == "ha.fence_failed"), None),
        8,
        "fence_failed alert",
    )
    assert "not fenced" in alert["message"] and "twice" in alert["message"]
    time.sleep(1.0)
    assert _vms(url)["guarded"]["host_id"] == victim
    assert not any(e["type"] == "ha.restarting" for e in _events(url))


def test_broker_outage_is_a_storm_not_a_fleet_wide_failure(mosquitto, procs, tmp_path):
    """When the broker vanishes for seconds, every host goes quiet at once: no host is failed or fenced."""
    url, agents, controller = _start_fleet(
        procs, mosquitto, tmp_path, "--ha-fencing", "process", "--fence-dir", str(tmp_path)
    )
    _create(url, "calm", ha=True)
    mosquitto.restart(down_s=2.0)
    wait_for(
        lambda: all(h["online"] and h["health"] == "up" for h in _hosts(url)),
        30,
        "recovery",
        [controller, *agents.values()],
    )
    time.sleep(1.0)
    kinds = [e["type"] for e in _events(url)]
    assert "host.failed" not in kinds and "ha.restarting" not in kinds and "ha.fenced" not in kinds, (
        "\n".join(f"{e['type']}: {e['message']}" for e in _events(url))
    )
    assert _vms(url)["calm"]["state"] == "running"


@contextlib.contextmanager
def _bmc_fleet(procs: Any, mosquitto: Any, tmp_path: Any) -> Iterator[tuple[str, Any]]:
    """h1's real agent as the power of a real ipmi_sim; h2 and h3 plain agents; BMC fencing on."""
    from tests.support.ipmi import IpmiSim, require_ipmi

    require_ipmi()
    command = [sys.executable, "-m", "fleetvisor", "agent", "--host-id", "h1", "--broker", mosquitto.url,
               "--state-dir", str(tmp_path / "h1"), *AGENT_ARGS]  # fmt: skip
    bmc = IpmiSim(tmp_path / "bmc", command, kill_wait_s=5)
    bmc.start()
    try:
        (tmp_path / "bmc.secret").write_text(f"{bmc.password}\n")
        config = {"h1": {"address": "127.0.0.1", "port": bmc.port, "username": bmc.username,
                         "password_file": str(tmp_path / "bmc.secret")}}  # fmt: skip
        (tmp_path / "bmc.json").write_text(json.dumps(config))
        bmc.ipmitool("chassis", "power", "on")
        fleet = start_process_fleet(
            procs, mosquitto.url, tmp_path, hosts=("h2", "h3"), agent_args=AGENT_ARGS,
            controller_args=("--ha-fencing", "bmc", "--bmc-config", str(tmp_path / "bmc.json")),
        )  # fmt: skip
        wait_for(
            lambda: any(h["host_id"] == "h1" and h["online"] for h in _hosts(fleet.url)), 30, "h1 via its BMC"
        )
        yield fleet.url, bmc
    finally:
        bmc.stop()


def _running_elsewhere(url: str, name: str) -> bool:
    vm = _vms(url)[name]
    return vm["host_id"] in ("h2", "h3") and vm["state"] == "running"


def test_bmc_fencing_powers_the_failed_host_off_over_ipmi_before_restarting(mosquitto, procs, tmp_path):
    """A killed agent: its BMC (a real ipmi_sim) is powered off and reads off; then the HA VM restarts."""
    with _bmc_fleet(procs, mosquitto, tmp_path) as (url, bmc):
        assert _create(url, "db-bmc", ha=True, scheduling={"start_on": "h1"})["host_id"] == "h1"
        os.kill(int((tmp_path / "h1" / "agent.pid").read_text()), signal.SIGKILL)  # the BMC lives on
        fenced = wait_for(
            lambda: next((e for e in _events(url) if e["type"] == "ha.fenced"), None), 15, "fenced"
        )
        assert "BMC" in fenced["message"] and "confirms power off" in fenced["message"]
        assert bmc.power_via_ipmitool() == "off", "ipmitool, an independent client, reads the chassis off"
        wait_for(lambda: _running_elsewhere(url, "db-bmc"), 10, "db-bmc running elsewhere")


def test_a_host_whose_bmc_reads_power_off_is_failed_even_if_its_agent_said_goodbye(
    mosquitto, procs, tmp_path
):
    """Power cut through the BMC: the agent may stop cleanly, but the BMC's "off" makes the host failed."""
    with _bmc_fleet(procs, mosquitto, tmp_path) as (url, bmc):
        assert _create(url, "web-bmc", ha=True, scheduling={"start_on": "h1"})["host_id"] == "h1"
        bmc.ipmitool("chassis", "power", "off")
        failed = wait_for(
            lambda: next(
                (e for e in _events(url) if e["type"] == "host.failed" and e["host_id"] == "h1"), None
            ),
            15,
            "h1 failed",
        )
        assert "reports power off" in failed["message"]
        wait_for(lambda: _running_elsewhere(url, "web-bmc"), 15, "web-bmc running elsewhere")
