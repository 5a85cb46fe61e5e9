"""Rolling maintenance against real processes (a controller, sim agents and the CLI on Mosquitto): the
end state is checked from the API and from what each agent last published from its own driver.

Four hosts hold three VMs each; anti-affinity group gN has a member on every host but hN, so a VM of
a host in maintenance has exactly one valid target. A watcher polls the records throughout and fails
the test if two members of a group are ever recorded on one host.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.support.brokers import MosquittoBroker
from tests.support.processes import ProcessFleet, reported_vms, run_cli, start_process_fleet, wait_for

HOSTS = ("h1", "h2", "h3", "h4")
GROUPS = ("g1", "g2", "g3", "g4")
BIG_HOST = ("--memory-mib", "65536", "--cores", "64")


def _grouped(procs: Any, broker: MosquittoBroker, tmp_path: Path) -> tuple[ProcessFleet, dict[str, str]]:
    fleet = start_process_fleet(procs, broker.url, tmp_path, hosts=HOSTS, agent_args=BIG_HOST)
    for group, missing in zip(GROUPS, HOSTS, strict=True):
        for host in HOSTS:
            if host != missing:
                body = {
                    "name": f"{group}-{host}",
                    "memory_mib": 128,
                    "workload": {"cpu_util": 0.3, "dirty_mib_s": 8},
                    "scheduling": {"start_on": host, "group": group, "group_policy": "anti-affinity"},
                }
                r = httpx.post(f"{fleet.url}/api/v1/vms", json=body, params={"wait": 30}, timeout=60)
                assert r.status_code == 200, r.text
    return fleet, {f"{g}-{h}": h for g, m in zip(GROUPS, HOSTS, strict=True) for h in HOSTS if h != m}


class GroupWatch:
    """Polls ``GET /vms`` in a thread; records every moment a group has two members on one host."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.broken: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GroupWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                vms = httpx.get(f"{self.url}/api/v1/vms", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                continue  # the controller is being restarted
            seen = Counter((v["name"].split("-")[0], v["host_id"]) for v in vms)
            self.broken += [f"{g} twice on {h}" for (g, h), n in seen.items() if n > 1]
            self.polls += 1
            self._stop.wait(0.05)


def _moves(url: str, op_id: str) -> Counter[str]:
    children = httpx.get(
        f"{url}/api/v1/operations", params={"parent": op_id, "limit": 1000}, timeout=10
    ).json()
    return Counter(
        c["vm"] for c in children["operations"] if c["kind"] == "migrate" and c["state"] == "succeeded"
    )


def _at_home(broker: MosquittoBroker, fleet: ProcessFleet, homes: dict[str, str]) -> list[str]:
    """What is not where it started, by the API's records and by the agents' own reports."""
    wrong = [f"{v['name']} recorded on {v['host_id']}" for v in httpx.get(f"{fleet.url}/api/v1/vms", timeout=5).json()
             if (v["host_id"], v["state"]) != (homes[v["name"]], "running")]  # fmt: skip
    for host in HOSTS:
        reported = reported_vms(broker.host, broker.port, host) or {}
        expected = {vm: "running" for vm, home in homes.items() if home == host}
        if reported != expected:
            wrong.append(f"{host} reports {sorted(reported.items())}")
    return wrong


def test_the_cli_rolls_four_hosts_with_exec_and_return_vms_keeping_groups_apart(
    mosquitto, procs, tmp_path
) -> None:
    fleet, homes = _grouped(procs, mosquitto, tmp_path)
    steps = tmp_path / "steps.txt"
    with GroupWatch(fleet.url) as watch:
        done = run_cli(
            fleet.url, "host", "rolling-maintenance", "-l", "", "--return-vms",
            "--exec", f'echo "$FLEETVISOR_HOST $FLEETVISOR_OPERATION" >> {steps}', timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert "every host done" in done.stdout and "h4: done" in done.stderr, done.stderr
    ran = [line.split() for line in steps.read_text().splitlines()]
    assert [h for h, _ in ran] == list(HOSTS), ran  # one step per host, in name order
    (op_id,) = {op for _, op in ran}
    assert watch.broken == [] and watch.polls > 20, (watch.broken, watch.polls)
    assert _moves(fleet.url, op_id) == {vm: 2 for vm in homes}  # out and back, no more
    wait_for(lambda: not _at_home(mosquitto, fleet, homes), 30, "every VM home", fleet.all)
    assert not any(h["maintenance"] for h in fleet.hosts())


def test_a_controller_killed_9_mid_roll_resumes_to_the_same_end_state(mosquitto, procs, tmp_path) -> None:
    fleet, homes = _grouped(procs, mosquitto, tmp_path)
    url = fleet.url
    body = {"selector": "", "return_vms": True, "step": "none"}
    with GroupWatch(url) as watch:
        op = httpx.post(f"{url}/api/v1/rolling-maintenance", json=body, timeout=30).json()

        def h2_moving() -> bool:
            got = httpx.get(f"{url}/api/v1/operations/{op['op_id']}", timeout=5).json()
            return bool(got["params"]["progress"]["h2"].get("moved"))

        wait_for(h2_moving, 60, "h2's evacuation under way", fleet.all)
        os.kill(fleet.controller.popen.pid, signal.SIGKILL)
        fleet.controller.popen.wait(10)
        again = procs(
            "controller-2", "controller", "--enrolment", "open",
            "--broker", mosquitto.url, "--db", str(tmp_path / "c.sqlite"), "--port", url.rsplit(":", 1)[1],
        )  # fmt: skip

        def ended() -> dict[str, Any] | None:
            try:
                got: dict[str, Any] = httpx.get(f"{url}/api/v1/operations/{op['op_id']}", timeout=2).json()
            except httpx.HTTPError:
                return None
            return got if got["state"] != "running" else None

        wait_for(
            lambda: ended() is not None,
            120,
            "the roll ends after the restart",
            [again, *fleet.agents.values()],
        )
    final = ended()
    assert final is not None and final["state"] == "succeeded", final
    assert watch.broken == [], watch.broken
    assert _moves(url, op["op_id"]) == {vm: 2 for vm in homes}  # nothing started twice
    wait_for(
        lambda: not _at_home(mosquitto, fleet, homes), 30, "every VM home", [again, *fleet.agents.values()]
    )


def test_an_exec_step_that_fails_stops_the_roll_and_leaves_that_host_in_maintenance(
    mosquitto, procs, tmp_path
) -> None:
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1", "h2", "h3"), agent_args=BIG_HOST)
    for host in ("h1", "h2", "h3"):
        body = {"name": f"vm-{host}", "memory_mib": 128, "scheduling": {"start_on": host}}
        assert (
            httpx.post(f"{fleet.url}/api/v1/vms", json=body, params={"wait": 30}, timeout=60).status_code
            == 200
        )
    done = run_cli(
        fleet.url,
        "host",
        "rolling-maintenance",
        "-l",
        "",
        "--exec",
        'test "$FLEETVISOR_HOST" != h2',
        timeout=300,
    )
    assert done.returncode == 1, done.stderr + done.stdout
    assert "h2: failed: its step failed: `test" in done.stderr and "exited 1" in done.stderr, done.stderr
    assert "h3: skipped" in done.stderr, done.stderr
    hosts = {h["host_id"]: h for h in fleet.hosts()}
    assert [hosts[h]["maintenance"] for h in ("h1", "h2", "h3")] == [False, True, False]
    vms = {v["name"]: v["host_id"] for v in httpx.get(f"{fleet.url}/api/v1/vms", timeout=5).json()}
    assert vms["vm-h3"] == "h3" and vms["vm-h2"] != "h2", vms  # h3 untouched; h2 emptied, still empty
    reported = reported_vms(mosquitto.host, mosquitto.port, "h2")
    assert reported is not None and "vm-h2" not in reported, reported
