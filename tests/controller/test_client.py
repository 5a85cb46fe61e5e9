"""The client library against a real local HTTP server that misbehaves on purpose: slow answers,
dropped connections, 503s and refusals. What a script sees must be what the CLI prints, and a
retry must never be a second request without the same idempotency key.
"""

from __future__ import annotations

import asyncio
import http.server
import inspect
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from controller.client import (
    ApiError,
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    NoAnswer,
    NotFound,
    OperationFailed,
    Unreachable,
    actions,
    admin,
    events,
    hosts,
    operations,
    sync,
    vms,
)

_OP = {
    "op_id": "op-1", "kind": "stop", "vm": "web-1", "host_id": "h1", "state": "succeeded", "error": "",
    "params": {}, "deadline": 0.0, "created_at": 1.0, "updated_at": 2.0,
}  # fmt: skip


class _Server(http.server.BaseHTTPRequestHandler):
    """Answers by a script: each path has a list of steps, taken in turn (the last one repeats)."""

    script: ClassVar[dict[str, list[Any]]] = {}
    seen: ClassVar[list[tuple[str, str, dict[str, str]]]] = []

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        type(self).seen.append((self.command, self.path, dict(self.headers)))
        steps = type(self).script.get(path, [(404, {"error": {"code": "not_found", "message": "no such"}})])
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        if step == "drop":  # read the request, then hang up without a word
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if isinstance(step, tuple) and step[0] == "sleep":
            time.sleep(step[1])
            step = (200, _OP)
        status, body = step
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Server.script = {}
    _Server.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_a_wait_longer_than_the_client_timeout_is_waited_for(server: str) -> None:
    """With wait=N the client allows N seconds beyond its own timeout (stop --force, migrate)."""
    _Server.script["/api/v1/vms/x/stop"] = [("sleep", 1.0)]
    with Client(server, timeout=0.3) as fv:
        assert fv.vms.stop("x", wait=2.0).state == "succeeded"


def test_a_slow_answer_is_no_answer_not_unreachable_and_is_not_sent_twice(server: str) -> None:
    """A controller that took the request but answers late may have acted on it: NoAnswer, which
    says so, and no second copy is sent behind the caller's back.
    """
    _Server.script["/api/v1/vms/x/stop"] = [("sleep", 1.0)]
    with Client(server, timeout=0.3) as fv, pytest.raises(NoAnswer) as raised:
        fv.vms.stop("x")
    assert not isinstance(raised.value, Unreachable) and "it is reachable" in str(raised.value)
    assert len([s for s in _Server.seen if s[0] == "POST"]) == 1


def test_a_closed_port_is_unreachable_after_the_retries() -> None:
    with Client("http://127.0.0.1:1", timeout=1, retries=1) as fv, pytest.raises(Unreachable) as raised:
        fv.hosts.list()
    assert "cannot reach the controller at http://127.0.0.1:1" in str(raised.value)
    assert "fleetvisor controller" in str(raised.value)


def test_a_dropped_connection_is_retried_with_the_same_idempotency_key(server: str) -> None:
    """The first try is read and then dropped, the second answers: one key for both, so the controller
    replays its first answer instead of stopping the VM twice.
    """
    _Server.script["/api/v1/vms/x/stop"] = ["drop", (200, _OP)]
    with Client(server, retries=2) as fv:
        assert fv.vms.stop("x").op_id == "op-1"
    keys = [h.get("Idempotency-Key") for method, _, h in _Server.seen if method == "POST"]
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0], keys


def test_a_503_is_retried_and_each_request_gets_its_own_key(server: str) -> None:
    busy = (503, {"error": {"code": "unavailable", "message": "starting up"}})
    _Server.script["/api/v1/vms/x/reboot"] = [busy, (200, _OP)]
    with Client(server) as fv:
        fv.vms.reboot("x")
        fv.vms.reboot("x")
    keys = [h["Idempotency-Key"] for method, _, h in _Server.seen if method == "POST"]
    assert len(keys) == 3 and keys[0] == keys[1] != keys[2], keys
    assert all("Idempotency-Key" not in h for method, _, h in _Server.seen if method == "GET")


def test_refusals_are_typed_and_carry_the_controllers_words(server: str) -> None:
    refusal = {"error": {"code": "vm_busy", "message": "vm web-1 is migrating; wait for op-7",
                         "detail": {"op_id": "op-7"}}}  # fmt: skip
    _Server.script["/api/v1/vms/web-1/start"] = [(409, refusal)]
    _Server.script["/api/v1/vms"] = [(400, {"error": {"code": "invalid_selector", "message": "bad ^"}})]
    with Client(server) as fv:
        with pytest.raises(Conflict) as busy:
            fv.vms.start("web-1")
        with pytest.raises(InvalidRequest):
            fv.vms.list("tier=(")
        with pytest.raises(NotFound) as missing:
            fv.hosts.get("nope")
    assert str(busy.value) == "vm web-1 is migrating; wait for op-7"
    assert (busy.value.status, busy.value.code, busy.value.detail) == (409, "vm_busy", {"op_id": "op-7"})
    assert missing.value.status == 404 and isinstance(missing.value, ApiError)


def test_an_answer_of_another_shape_says_so(server: str) -> None:
    _Server.script["/api/v1/hosts"] = [(200, {"not": "a list"})]
    with Client(server) as fv, pytest.raises(ApiError) as raised:
        fv.hosts.list()
    assert raised.value.code == "unexpected_answer" and "same version" in str(raised.value)


def test_wait_long_polls_until_the_end_and_check_raises_on_failure(server: str) -> None:
    running, failed = {**_OP, "state": "running"}, {**_OP, "state": "failed", "error": "no host has room"}
    _Server.script["/api/v1/operations/op-1"] = [(200, running), (200, running), (200, failed)]
    with Client(server) as fv, pytest.raises(OperationFailed) as raised:
        fv.operations.wait("op-1", check=True)
    assert raised.value.operation.error == "no host has room" and "no host has room" in str(raised.value)
    waits = [p for m, p, _ in _Server.seen if m == "GET"]
    assert len(waits) == 3 and all("wait=" in p for p in waits), waits


def test_iterate_follows_every_page(server: str) -> None:
    page1 = {"operations": [{**_OP, "op_id": "a"}, {**_OP, "op_id": "b"}], "next": "cursor-1"}
    page2 = {"operations": [{**_OP, "op_id": "c"}], "next": None}
    _Server.script["/api/v1/operations"] = [(200, page1), (200, page2)]
    with Client(server) as fv:
        assert [op.op_id for op in fv.operations.iterate(kind="stop", page_size=2)] == ["a", "b", "c"]
    assert "page=cursor-1" in _Server.seen[1][1] and "kind=stop" in _Server.seen[1][1]


def test_the_async_client_is_the_same_client(server: str) -> None:
    _Server.script["/api/v1/vms/x/pause"] = [(202, {**_OP, "state": "running"})]

    async def main() -> str:
        async with AsyncClient(server) as fv:
            return (await fv.vms.pause("x")).state

    assert asyncio.run(main()) == "running"


@pytest.mark.parametrize(
    ("resource", "twin"),
    [
        (vms.Vms, sync.SyncVms), (hosts.Hosts, sync.SyncHosts), (operations.Operations, sync.SyncOperations),
        (actions.Actions, sync.SyncActions), (actions.Rolling, sync.SyncRolling), (events.Events, sync.SyncEvents),
        (admin.Power, sync.SyncPower), (admin.Tokens, sync.SyncTokens), (admin.Audit, sync.SyncAudit),
    ],
)  # fmt: skip
def test_every_async_method_has_a_blocking_twin_of_the_same_kind(resource: type, twin: type) -> None:
    """A method added to the async client and forgotten in the blocking one fails here."""
    public = {n: f for n, f in vars(resource).items() if not n.startswith("_") and inspect.isfunction(f)}
    assert set(public) == {n for n in vars(twin) if not n.startswith("_")}, resource.__name__
    for name, fn in public.items():
        wrapper = vars(twin)[name]
        kind = sync._BlockingIter if inspect.isasyncgenfunction(fn) else sync._Blocking
        assert type(wrapper) is kind, f"{resource.__name__}.{name}"
