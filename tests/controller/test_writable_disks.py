"""DiskSpec.writable end to end: the CLI's spec file and the REST API accept it, the bus carries it to
the agent, and contradictions are refused with the field and the fix.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

import fleetvisor
from controller import cli as operator_cli
from tests.support.brokers import MosquittoBroker
from tests.support.fleet import Fleet

SPEC_YAML = """\
name: db-1
disks:
  - target: vda
    source: /var/lib/fleetvisor/images/base.qcow2
  - target: vdb
    source: /var/lib/fleetvisor/images/db-1-data.raw
    format: raw
    overlay: false
    writable: true
  - target: vdc
    source: /var/lib/fleetvisor/images/shared-tools.raw
    format: raw
    overlay: false
"""


async def test_a_spec_file_with_a_writable_disk_reaches_the_agent(
    mosquitto: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fleetvisor vm create -f spec.yaml`: writable survives the CLI, the API, the store and the bus."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC_YAML)
    async with Fleet(mosquitto.url, tmp_path / "fleet") as fleet:
        await fleet.add_agent("h1")
        args = fleetvisor.build_parser().parse_args(
            ["vm", "create", "-f", str(spec_file), "--url", fleet.api_url]
        )
        code = await asyncio.to_thread(operator_cli.run_operator_command, args)
        out = capsys.readouterr()
        assert code == 0, out.out + out.err
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=30) as client:
            shown = (await client.get("/vms/db-1")).json()
        assert [(d["target"], d["writable"]) for d in shown["spec"]["disks"]] == [
            ("vda", False),
            ("vdb", True),
            ("vdc", False),
        ]
        [vm] = await fleet.drivers["h1"].list()
        assert [(d.target, d.guest_read_only) for d in vm.spec.disks] == [
            ("vda", False),
            ("vdb", False),
            ("vdc", True),
        ]


async def test_contradictory_writable_disks_are_refused_with_the_fix(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """POST /vms: writable with readonly, or with an overlay, is a 400 naming the disk and what to do."""
    bad = {
        "keep one": {
            "target": "vdb",
            "source": "/i/a.raw",
            "overlay": False,
            "readonly": True,
            "writable": True,
        },
        "set overlay: false": {"target": "vdb", "source": "/i/a.raw", "writable": True},
    }
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=30) as client:
            for fix, disk in bad.items():
                response = await client.post(
                    "/vms", json={"name": "db-1", "disks": [disk]}, params={"wait": 10}
                )
                assert response.status_code == 400, response.text
                message = response.json()["error"]["message"]
                assert "disk vdb" in message and fix in message and "$.disks[0]" in message, message
            assert (await client.get("/vms")).json() == []
