"""The CLI's REST client against a real local HTTP server that answers slowly: a wait the controller
honours is never cut short, and a slow answer is never reported as an unreachable controller.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest

from controller.cli.client import EXIT_FAILED, EXIT_UNREACHABLE, ApiClient, CliError


class _Slow(http.server.BaseHTTPRequestHandler):
    delay_s = 1.0

    def do_POST(self) -> None:
        time.sleep(self.delay_s)
        body = json.dumps({"state": "succeeded"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_wait_longer_than_the_client_timeout_is_waited_for(slow_server: str) -> None:
    """With ?wait=N the client allows N seconds beyond its own timeout (stop --force, migrate)."""
    client = ApiClient(slow_server, timeout=0.3)
    try:
        assert client.request("POST", "/vms/x/stop", params={"wait": 2.0}) == {"state": "succeeded"}
    finally:
        client.close()


def test_a_slow_answer_is_not_called_unreachable(slow_server: str) -> None:
    """A controller that accepted the request but answers late is reachable: exit 1, not 3, and says so."""
    client = ApiClient(slow_server, timeout=0.3)
    try:
        with pytest.raises(CliError) as raised:
            client.request("POST", "/vms/x/stop")
    finally:
        client.close()
    assert raised.value.exit_code == EXIT_FAILED != EXIT_UNREACHABLE
    assert "it is reachable" in str(raised.value)


def test_a_closed_port_is_unreachable() -> None:
    """Nothing listening: exit 3 with how to start a controller."""
    client = ApiClient("http://127.0.0.1:1", timeout=1)
    try:
        with pytest.raises(CliError) as raised:
            client.request("GET", "/hosts")
    finally:
        client.close()
    assert raised.value.exit_code == EXIT_UNREACHABLE and "fleetvisor controller" in str(raised.value)
