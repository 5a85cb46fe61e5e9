"""Safe retries against real processes: a POST sent again with its Idempotency-Key gets the first
answer and never a second operation, also when the copies arrive at once, and after the controller
is killed with -9 and started again; the same key with another body is refused.
"""

from __future__ import annotations

import asyncio
import os
import signal

import httpx

from tests.support.processes import start_process_fleet, wait_for


def _creates(url: str, vm: str) -> list[dict[str, object]]:
    body = httpx.get(f"{url}/api/v1/operations", params={"vm": vm, "kind": "create"}, timeout=5).json()
    return body["operations"]  # type: ignore[no-any-return]


def test_the_same_key_gives_one_operation_even_concurrently_and_across_a_kill_9(
    mosquitto, procs, tmp_path
) -> None:
    fleet = start_process_fleet(procs, mosquitto.url, tmp_path, hosts=("h1", "h2"))
    url = fleet.url
    spec = {"name": "web", "memory_mib": 256}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.post(
                            "/api/v1/vms", json=spec, params={"wait": 10}, headers={"Idempotency-Key": "k-1"}
                        )
                        for _ in range(6)
                    )
                )
            )

    answers = asyncio.run(burst())
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    assert len({r.content for r in answers}) == 1, "every copy gets the first answer"
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 5
    assert len(_creates(url, "web")) == 1
    assert [v["name"] for v in httpx.get(f"{url}/api/v1/vms", timeout=5).json()] == ["web"]

    other = httpx.post(
        f"{url}/api/v1/vms", json={**spec, "memory_mib": 512}, headers={"Idempotency-Key": "k-1"}
    )
    assert other.status_code == 409, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert "a new request needs a new key" in other.json()["error"]["message"]
    bad = httpx.post(f"{url}/api/v1/vms", json={"name": "x"}, headers={"Idempotency-Key": "has space"})
    assert bad.status_code == 400 and bad.json()["error"]["detail"] == {"header": "Idempotency-Key"}
    assert httpx.get(f"{url}/api/v1/vms/x", timeout=5).status_code == 404

    # the answers live in the store: a controller killed -9 and started again still replays them
    controller = fleet.controller.popen
    os.kill(controller.pid, signal.SIGKILL)
    controller.wait(10)
    port = url.rsplit(":", 1)[1]
    again = procs(
        "controller-2", "controller", "--enrolment", "open",
        "--broker", mosquitto.url, "--db", str(tmp_path / "c.sqlite"), "--port", port,
    )  # fmt: skip
    wait_for(
        lambda: httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200,
        30,
        "controller back",
        [again],
    )
    retried = httpx.post(
        f"{url}/api/v1/vms", json=spec, params={"wait": 10}, headers={"Idempotency-Key": "k-1"}
    )
    assert retried.status_code == 200 and retried.headers.get("idempotent-replayed") == "true", retried.text
    assert retried.content == answers[0].content
    assert len(_creates(url, "web")) == 1
    # without a key, the same POST is a new request: the name is taken
    plain = httpx.post(f"{url}/api/v1/vms", json=spec, timeout=10)
    assert plain.status_code == 409, plain.text
