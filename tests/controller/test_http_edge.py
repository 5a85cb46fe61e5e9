"""The API's HTTP edge against the attacks seen on it: huge streamed bodies, half-open connections,
cross-site and rebound requests, tokens in URLs, and an open admin API on the network.

The body and connection tests run a real controller process and talk to it over real sockets.
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from controller.api.edge import EdgeOptions
from controller.daemon import Controller, ControllerSettings
from tests.support import free_port
from tests.support.fleet import FAST_BUS
from tests.support.processes import ROOT, Proc, wait_for

_MIB = 1024 * 1024


def _start(procs, broker_url: str, tmp_path, *args: str, prefix: tuple[str, ...] = ()) -> tuple[str, Proc]:
    port = free_port()
    proc = procs(
        "controller", "controller", "--broker", broker_url, "--db", str(tmp_path / "c.sqlite"),
        "--port", str(port), "--enrolment", "open", *args, prefix=prefix,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200, 20, "the API", [proc])
    return url, proc


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    chunk = b" " * size
    for _ in range(total // size):
        yield chunk


@pytest.mark.timeout(120)
def test_a_chunked_200_mb_body_is_refused_while_it_streams_and_memory_stays_bounded(
    mosquitto, procs, tmp_path
):
    """A chunked 200 MB POST gets 413 at the 1 MiB limit; the controller's peak RSS grows < 40 MiB."""
    url, proc = _start(procs, mosquitto.url, tmp_path)
    before = _peak_rss_mib(proc.popen.pid)
    started = time.monotonic()
    r = httpx.post(
        f"{url}/api/v1/vms",
        content=_chunks(200 * _MIB),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    grown = _peak_rss_mib(proc.popen.pid) - before
    assert grown < 40, f"peak RSS grew by {grown:.0f} MiB for a refused body"
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "body_too_large" and "--max-body" in error["message"]
    assert time.monotonic() - started < 30
    assert httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(mosquitto, procs, tmp_path):
    """Content-Length above --max-body: 413 comes back although no byte of the body was sent."""
    url, _ = _start(procs, mosquitto.url, tmp_path, "--max-body", "4096")
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"POST /api/v1/vms HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1024 * _MIB}\r\n\r\n".encode()
        )
        head = sock.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert "connection: close" in head.lower()
    r = httpx.post(f"{url}/api/v1/vms", json={"name": "x" * 5000}, timeout=5)
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]


@pytest.mark.timeout(120)
def test_two_thousand_half_open_connections_neither_exhaust_descriptors_nor_stay_open(
    mosquitto, procs, tmp_path
):
    """2,000 stalled request lines against a controller allowed 1,024 descriptors: a normal client is
    answered within 3 s, and every stalled connection is closed within the header timeout.
    """
    url, proc = _start(
        procs, mosquitto.url, tmp_path, "--header-timeout", "2",
        prefix=("prlimit", "--nofile=1024:1024", "--"),
    )  # fmt: skip
    port = int(url.rsplit(":", 1)[1])
    stalled = []
    try:
        for _ in range(2000):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.")
            stalled.append(sock)
        started = time.monotonic()
        r = httpx.get(f"{url}/api/v1/health", timeout=3)
        assert r.status_code == 200 and time.monotonic() - started < 3
        deadline = time.monotonic() + 6
        still_open = 0
        for sock in stalled:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if sock.recv(1024) != b"":
                    still_open += 1
            except ConnectionResetError:
                pass
            except TimeoutError:
                still_open += 1
        assert still_open == 0, f"{still_open} of 2000 half-open connections are still open"
        assert "did not send a request head in time" in proc.output()
    finally:
        for sock in stalled:
            sock.close()


def _settings(tmp_path, broker_url: str, **edge: object) -> ControllerSettings:
    return ControllerSettings(
        broker_url=broker_url,
        db_path=tmp_path / "c.sqlite",
        api_port=0,
        edge=EdgeOptions(**edge),  # type: ignore[arg-type]
        bus_overrides=FAST_BUS,
    )


async def test_cross_site_and_rebound_requests_are_refused_with_the_header_and_the_fix(mosquitto, tmp_path):
    """text/plain POST from evil.example: 403; non-JSON: 415; foreign Host: 421; each names the fix."""
    settings = _settings(
        tmp_path, mosquitto.url, server_names=("fleet.example",), allowed_origins=("https://ui.example",)
    )
    async with Controller(settings) as controller:
        port = controller.settings.api_port
        async with httpx.AsyncClient(base_url=f"{controller.api_url}/api/v1") as api:
            spec = b'{"name": "web-1", "memory_mib": 256}'
            r = await api.post(
                "/vms", content=spec, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}
            )
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "origin_not_allowed"
            assert "--allowed-origin http://evil.example" in r.json()["error"]["message"]
            r = await api.post("/vms", content=spec, headers={"Content-Type": "text/plain"})
            assert r.status_code == 415 and r.json()["error"]["detail"] == {"header": "Content-Type"}
            r = await api.post(
                "/vms", content=spec, headers={"Content-Type": "application/x-www-form-urlencoded"}
            )
            assert r.status_code == 415
            r = await api.get("/vms", headers={"Host": f"evil.example:{port}"})
            assert r.status_code == 421 and "--server-name evil.example" in r.json()["error"]["message"]
            r = await api.get("/vms", headers={"Host": "127.0.0.1:1"})
            assert r.status_code == 421
            # What is allowed: its own names, its own origin, configured origins, JSON, and no body at all.
            for host in (f"fleet.example:{port}", f"localhost:{port}", "fleet.example"):
                assert (await api.get("/vms", headers={"Host": host})).status_code == 200, host
            for origin in (f"http://127.0.0.1:{port}", "https://ui.example"):
                assert (await api.get("/vms", headers={"Origin": origin})).status_code == 200, origin
            r = await api.post(
                "/vms", content=spec, headers={"Content-Type": "application/json; charset=utf-8"}
            )
            assert r.json()["error"]["code"] == "no_valid_host"  # reached the service: no hosts here
            assert (await api.post("/vms/nope/start")).status_code == 404


async def test_a_token_in_the_url_or_an_overlong_path_is_refused_and_never_audited(mosquitto, tmp_path):
    """?token= and ?access_token= get 400 naming the header to use; 60 KB paths get 414; neither is audited."""
    async with (
        Controller(_settings(tmp_path, mosquitto.url)) as controller,
        httpx.AsyncClient(base_url=f"{controller.api_url}/api/v1") as api,
    ):
        for name in ("token", "access_token", "Access_Token"):
            r = await api.delete("/vms/web-1", params={name: "fvt_secret-in-url"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "token_in_url"
            assert "Authorization: Bearer" in r.json()["error"]["message"]
        r = await api.post(f"/vms/{'a' * 60_000}/start")
        assert r.status_code == 414
        assert controller.authority is not None
        assert controller.authority.audit_since(0) == []


def _controller_cli(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetvisor", "controller", "--db", str(tmp_path / "c.sqlite"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_an_open_admin_api_on_the_network_refuses_to_start(tmp_path):
    """--listen 0.0.0.0 without --auth exits 1 naming --auth and --insecure-no-auth."""
    done = _controller_cli(tmp_path, "--listen", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode == 1
    assert "--listen 0.0.0.0" in done.stderr and "--auth" in done.stderr
    assert "--insecure-no-auth" in done.stderr


def test_insecure_no_auth_starts_with_a_loud_warning(mosquitto, procs, tmp_path):
    """--insecure-no-auth accepts the risk: the controller starts and says so in its log."""
    url, proc = _start(procs, mosquitto.url, tmp_path, "--listen", "0.0.0.0", "--insecure-no-auth")
    assert httpx.get(f"{url}/api/v1/vms", timeout=5).status_code == 200
    assert "WITHOUT AUTH (--insecure-no-auth)" in proc.output()
