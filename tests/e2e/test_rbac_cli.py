"""Roles through the CLI against a real controller process with ``--auth`` and a real agent: an admin
hands out viewer and operator tokens with ``fleetvisor token``, each is held to its role, and a revoked
token stops working.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.support import free_port
from tests.support.processes import ROOT, start_agent, wait_for


def _cli(url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEETVISOR_URL": url, "FLEETVISOR_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "fleetvisor", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(120)
def test_token_roles_through_the_cli(mosquitto, procs, tmp_path):
    """Admin creates a viewer and an operator; the viewer's create is refused readably, the operator's
    succeeds, and after `token revoke` the viewer is turned away.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    controller = procs(
        "controller", "controller", "--broker", mosquitto.url, "--db", str(tmp_path / "c.sqlite"),
        "--port", str(port), "--auth", "--enrolment", "open",
    )  # fmt: skip
    start_agent(procs, mosquitto.url, tmp_path, "h1")
    admin_file = tmp_path / "admin.token"
    wait_for(admin_file.exists, 20, "the admin token", [controller])
    admin = admin_file.read_text().strip()
    wait_for(
        lambda: any(
            h["online"]
            for h in httpx.get(f"{url}/api/v1/hosts", headers={"Authorization": f"Bearer {admin}"}).json()
        ),
        30,
        "h1 online",
        [controller],
    )

    tokens = {}
    for name, role in (("ann", "viewer"), ("bob", "operator")):
        done = _cli(url, admin, "token", "create", name, "--role", role)
        assert done.returncode == 0, done.stderr
        tokens[name] = done.stdout.strip().splitlines()[-1]
        assert tokens[name].startswith("fvt_")
    listed = _cli(url, admin, "token", "list")
    assert listed.returncode == 0 and "ann" in listed.stdout and "bob" in listed.stdout
    assert tokens["ann"] not in listed.stdout

    refused = _cli(url, tokens["ann"], "vm", "create", "web-1", "--memory", "256")
    assert refused.returncode != 0
    assert "POST /api/v1/vms needs the operator role; token 'ann' has viewer" in refused.stderr
    assert _cli(url, tokens["ann"], "vm", "list").returncode == 0
    refused = _cli(url, tokens["bob"], "token", "create", "eve", "--role", "admin")
    assert refused.returncode != 0 and "needs the admin role" in refused.stderr

    created = _cli(url, tokens["bob"], "vm", "create", "web-1", "--memory", "256")
    assert created.returncode == 0, created.stderr
    shown = _cli(url, tokens["ann"], "vm", "list")
    assert "web-1" in shown.stdout

    assert _cli(url, admin, "token", "revoke", "ann").returncode == 0
    gone = _cli(url, tokens["ann"], "vm", "list")
    assert gone.returncode != 0 and "unknown or revoked" in gone.stderr
