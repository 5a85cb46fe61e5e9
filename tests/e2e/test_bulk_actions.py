"""Bulk actions against real processes (a controller and sim agents on Mosquitto): the end state is
checked from the API and from what each agent last published from its own driver.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import httpx

from tests.support.brokers import MosquittoBroker
from tests.support.processes import ProcessFleet, reported_vms, start_process_fleet, wait_for

BIG_HOST = ("--memory-mib", "65536", "--cores", "128")


def _post(url: str, path: str, body: dict[str, Any], wait: float = 0) -> Any:
    r = httpx.post(f"{url}/api/v1{path}", json=body, params={"wait": wait}, timeout=120)
    assert r.status_code in (200, 202), r.text
    return r.json()


def _children(url: str, parent: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/operations", params={"parent": parent, "limit": 1000}, timeout=10).json()
    return body["operations"]  # type: ignore[no-any-return]


def _most_at_once(ops: list[dict[str, Any]]) -> int:
    """The most children that were running at one moment (from their start and end times)."""
    edges = sorted(
        [(o["created_at"], 1) for o in ops] + [(o["updated_at"], -1) for o in ops], key=lambda e: (e[0], e[1])
    )
    most = running = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _where(broker: MosquittoBroker, hosts: tuple[str, ...]) -> dict[str, list[tuple[str, str]]]:
    """Each VM's (host, state) copies as the agents report them."""
    copies: dict[str, list[tuple[str, str]]] = {}
    for host in hosts:
        for vm, state in (reported_vms(broker.host, broker.port, host) or {}).items():
            copies.setdefault(vm, []).append((host, state))
    return copies


def _vms(url: str, selector: str = "") -> dict[str, dict[str, Any]]:
    listed = httpx.get(f"{url}/api/v1/vms", params={"selector": selector}, timeout=10).json()
    return {v["name"]: v for v in listed}


def _fleet_with_web_vms(procs: Any, broker: MosquittoBroker, tmp_path: Any, count: int) -> ProcessFleet:
    fleet = start_process_fleet(procs, broker.url, tmp_path, hosts=("h1", "h2"), agent_args=BIG_HOST)
    body = {"name": "web", "memory_mib": 64, "count": count, "labels": {"tier": "web"}}
    created = _post(fleet.url, "/vms", body, wait=120)
    assert len(created["vms"]) == count, created
    _post(fleet.url, "/vms", {"name": "db-1", "memory_mib": 64, "labels": {"tier": "db"}}, wait=30)
    return fleet


def test_a_bulk_stop_of_200_vms_never_runs_more_than_max_parallel_and_spares_the_rest(
    mosquitto, procs, tmp_path
) -> None:
    fleet = _fleet_with_web_vms(procs, mosquitto, tmp_path, 200)
    url = fleet.url
    plan = _post(url, "/actions", {"action": "stop", "selector": "tier=web", "dry_run": True})
    assert len(plan["targets"]) == 200 and "db-1" not in plan["targets"]
    assert not _children(url, "x") and len(_vms(url, "state=running")) == 201, "a dry run changes nothing"

    op = _post(
        url,
        "/actions",
        {"action": "stop", "selector": "tier=web", "max_parallel": 10, "force": True},
        wait=300,
    )
    assert op["state"] == "succeeded", op["error"]
    assert op["kind"] == "bulk" and len(op["params"]["results"]) == 200
    assert set(op["params"]["results"].values()) == {"done"}
    children = _children(url, op["op_id"])
    assert len(children) == 200 and {c["kind"] for c in children} == {"stop"}
    assert len({c["vm"] for c in children}) == 200, "one child per VM"
    most = _most_at_once(children)
    assert 2 <= most <= 10, f"{most} stops ran at once (max_parallel 10)"
    states = {n: v["state"] for n, v in _vms(url).items()}
    assert states.pop("db-1") == "running" and set(states.values()) == {"stopped"}

    def agents_agree() -> list[str]:
        copies = _where(mosquitto, ("h1", "h2"))
        wrong = [vm for vm, c in copies.items() if vm != "db-1" and [s for _, s in c] != ["stopped"]]
        return wrong + ([] if [s for _, s in copies.get("db-1", [])] == ["running"] else ["db-1"])

    wait_for(lambda: not agents_agree(), 30, "the agents report every web VM stopped", fleet.all)


def test_a_bulk_stop_resumes_after_the_controller_is_killed_9_and_starts_nothing_twice(
    mosquitto, procs, tmp_path
) -> None:
    fleet = _fleet_with_web_vms(procs, mosquitto, tmp_path, 40)
    url = fleet.url
    op = _post(url, "/actions", {"action": "stop", "selector": "tier=web", "max_parallel": 2})
    wait_for(lambda: len(_children(url, op["op_id"])) >= 4, 30, "a few stops under way", fleet.all)
    controller = fleet.controller.popen
    os.kill(controller.pid, signal.SIGKILL)
    controller.wait(10)
    again = procs(
        "controller-2", "controller", "--enrolment", "open",
        "--broker", mosquitto.url, "--db", str(tmp_path / "c.sqlite"), "--port", url.rsplit(":", 1)[1],
    )  # fmt: skip

    def ended() -> bool:
        try:
            got = httpx.get(f"{url}/api/v1/operations/{op['op_id']}", timeout=2).json()
        except httpx.HTTPError:
            return False
        return got["state"] != "running"

    wait_for(ended, 120, "the resumed bulk stop to end", [again])
    done = httpx.get(f"{url}/api/v1/operations/{op['op_id']}", timeout=5).json()
    assert done["state"] == "succeeded", done["error"]
    children = _children(url, op["op_id"])
    assert sorted(c["vm"] for c in children) == sorted(f"web-{i}" for i in range(1, 41)), "one stop per VM"
    states = {n: v["state"] for n, v in _vms(url).items()}
    assert states.pop("db-1") == "running" and set(states.values()) == {"stopped"}


def test_a_bulk_migrate_cancelled_half_way_leaves_every_vm_running_exactly_once(
    mosquitto, procs, tmp_path
) -> None:
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1", "h2"), agent_args=BIG_HOST)
    url = fleet.url
    for i in range(1, 9):
        body = {
            "name": f"app-{i}",
            "memory_mib": 2048,
            "labels": {"tier": "app"},
            "scheduling": {"start_on": "h1"},
        }
        _post(url, "/vms", body, wait=30)
    op = _post(url, "/actions", {"action": "migrate", "selector": "tier=app", "to": "h2", "max_parallel": 1})
    wait_for(
        lambda: (
            len(httpx.get(f"{url}/api/v1/operations/{op['op_id']}", timeout=5).json()["params"]["results"])
            >= 2
        ),
        60,
        "two migrations settled",
        fleet.all,
    )
    cancelled = httpx.post(f"{url}/api/v1/operations/{op['op_id']}/cancel", timeout=10)
    assert cancelled.status_code in (200, 202), cancelled.text
    wait_for(
        lambda: httpx.get(f"{url}/api/v1/operations/{op['op_id']}", timeout=5).json()["state"] != "running",
        60,
        "the cancelled bulk migrate to end",
        fleet.all,
    )
    done = httpx.get(f"{url}/api/v1/operations/{op['op_id']}", timeout=5).json()
    results = done["params"]["results"]
    assert done["state"] == "failed" and len(results) == 8, done
    skipped = [t for t, r in results.items() if r.startswith("skipped")]
    assert 1 <= len(skipped) <= 6, results  # some moved before the cancel, the rest never started
    assert len(_children(url, op["op_id"])) == 8 - len(skipped)
    vms = _vms(url, "tier=app")
    assert {v["state"] for v in vms.values()} == {"running"} and len(vms) == 8
    assert {n for n, v in vms.items() if v["host_id"] == "h1"} >= set(skipped)

    def copies_wrong() -> list[str]:
        copies = _where(mosquitto, ("h1", "h2"))
        return [
            f"{n}: {copies.get(n)}" for n, v in vms.items() if copies.get(n) != [(v["host_id"], "running")]
        ]

    wait_for(lambda: not copies_wrong(), 30, "each VM running exactly once, where the API says", fleet.all)
