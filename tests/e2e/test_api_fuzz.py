"""Schemathesis fuzzes the REST API from its served OpenAPI document, against real processes.

For every operation it generates valid and invalid requests; the controller must never answer 5xx,
and a refused request (4xx) must leave the fleet exactly as it was. Auth is on, as it is on any
controller reachable from the network: the fuzzer holds an admin token of its own (not the first one,
so a fuzzed revoke of ``admin`` does not lock it out).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support import free_port
from tests.support.processes import start_agent, wait_for

_SETTLED = ("running", "paused", "stopped", "crashed", "error", "missing")


def _settled(vm: dict[str, object]) -> bool:
    # A VM booting with no operation in flight is settled: a fuzzed spec may ask for a boot of up to
    # 600 s (workload.boot_s), and its boot ending is no change a refused request made.
    return vm["state"] in _SETTLED or (vm["state"] == "starting" and not vm["operation"])


def _snapshot(url: str, headers: dict[str, str]) -> tuple[object, object]:
    """The fleet once no operation is in flight (earlier accepted requests may still be finishing)."""
    vms = wait_for(
        lambda: (
            (v := httpx.get(f"{url}/api/v1/vms", headers=headers, timeout=5).json())
            and all(_settled(x) for x in v)
            and v
        ),
        15,
        "operations to settle",
    )
    hosts = httpx.get(f"{url}/api/v1/hosts", headers=headers, timeout=5).json()
    booted = {"starting": "running"}
    return (
        sorted((v["name"], booted.get(v["state"], v["state"]), v["host_id"]) for v in vms),
        sorted((h["host_id"], h["allocated_memory_mib"], h["vms"]) for h in hosts),
    )


@pytest.mark.timeout(240)
def test_fuzzed_requests_never_get_5xx_and_refusals_change_nothing(mosquitto, procs, tmp_path):
    """Every documented operation, fuzzed: no 5xx, and no state change when the answer is 4xx."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    controller = procs(
        "controller", "controller", "--broker", mosquitto.url, "--db", str(tmp_path / "c.sqlite"),
        "--port", str(port), "--auth", "--enrolment", "open",
    )  # fmt: skip
    start_agent(procs, mosquitto.url, tmp_path, "h1")
    wait_for((tmp_path / "admin.token").exists, 20, "the admin token", [controller])
    first = {"Authorization": f"Bearer {(tmp_path / 'admin.token').read_text().strip()}"}
    wait_for(
        lambda: any(h["online"] for h in httpx.get(f"{url}/api/v1/hosts", headers=first, timeout=3).json()),
        30,
        "h1 online",
        [controller],
    )
    mine = httpx.post(
        f"{url}/api/v1/tokens", json={"name": "fuzz-9f3a7c", "role": "admin"}, headers=first, timeout=5
    )
    headers = {"Authorization": f"Bearer {mine.json()['token']}"}
    httpx.post(
        f"{url}/api/v1/vms",
        json={"name": "keep-me", "memory_mib": 256},
        params={"wait": 10},
        headers=headers,
        timeout=15,
    )

    schema = schemathesis.openapi.from_url(f"{url}/api/v1/openapi.json")
    assert httpx.get(f"{url}/api/v1/vms", timeout=5).status_code == 401  # auth is really on
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events/stream"):
            continue  # an endless stream; covered by its own test
        operations += 1

        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: object) -> None:
            before = _snapshot(url, headers)
            response = case.call(base_url=url, headers=headers, timeout=30)  # type: ignore[attr-defined]
            where = f"{case.method} {case.formatted_path} {case.query} {case.body!r}"  # type: ignore[attr-defined]
            if response.status_code >= 500:
                failures.append(f"{where} -> {response.status_code} {response.text[:300]}")
            elif 400 <= response.status_code < 500:
                after = _snapshot(url, headers)
                if after != before:
                    failures.append(
                        f"{where} -> {response.status_code} but the fleet changed: {before} -> {after}"
                    )
                body = response.json()
                if "error" not in body or not body["error"].get("message"):
                    failures.append(f"{where} -> {response.status_code} without an error message: {body}")

        check()
    assert operations >= 10
    assert failures == [], "\n".join(failures[:20])
