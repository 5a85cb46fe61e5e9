"""The wire bounds in a running fleet: a host's forged inventory (10^9 cores, 10^12 MiB) published
through a real Mosquitto is dropped, so the host keeps its real capacity and a 512-vCPU, 16 TiB VM is
refused; and the REST API refuses a stop whose timeout the agent's ShutdownVm would refuse.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import msgspec
import pytest

from protocols import codec, topics
from protocols.bus import Bus, BusSettings
from tests.support.brokers import MosquittoBroker
from tests.support.fleet import FAST_BUS, Fleet, eventually


async def test_a_forged_inventory_of_a_billion_cores_is_dropped(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """h1's inventory claiming 10^9 cores and 10^12 MiB never reaches the store or the scheduler."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        ctl = fleet.ctl
        genuine = ctl.live.inventories["h1"]
        huge = msgspec.structs.replace(
            genuine.capabilities, cores=10**9, memory_mib=10**12, power_max_w=1e308
        )
        # The next seq of the agent's own run: only the bounds stand in the way (without them, enrolment
        # would take it as a capacity change and hold h1 as pending, which is also a change).
        forged = msgspec.structs.replace(genuine, seq=genuine.seq + 1, capabilities=huge)
        before = ctl.intake.decoder.stats.by_reason["wrong_type"]

        def _handled() -> bool:
            record = ctl.store.host("h1")
            # Taken, or held as pending by enrolment's capacity check: either way it was not dropped.
            taken = record is None or record.capabilities.cores != genuine.capabilities.cores
            return (
                taken
                or (record is not None and not record.online)
                or ctl.intake.decoder.stats.by_reason["wrong_type"] > before
            )

        bus = Bus(BusSettings(url=mosquitto.url, client_id="h1-impostor", **FAST_BUS))  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, logger="protocols.codec"):
            async with bus:
                await bus.wait_connected(5)
                await bus.publish(
                    topics.host_topic("h1", "inventory"), codec.encode(forged), qos=1, retain=True
                )
                await eventually(lambda: _handled(), 5, "the forged inventory refused or taken")
        assert any("`$.capabilities.cores`" in r.getMessage() for r in caplog.records), caplog.text
        record = ctl.store.host("h1")
        assert record is not None and record.capabilities.cores == genuine.capabilities.cores
        assert record.online, "a dropped inventory changes nothing: h1 is not held as pending either"
        assert record.capabilities.memory_mib == genuine.capabilities.memory_mib
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=30) as client:
            r = await client.post(
                "/vms", json={"name": "giant", "vcpus": 512, "memory_mib": 16 * 1024 * 1024}
            )
            assert r.status_code == 409, r.text
            assert ctl.store.vm("giant") is None


async def test_a_stop_timeout_beyond_the_bound_is_refused_by_the_api(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """POST /vms/NAME/stop with timeout_s 1e9, 0 or -1 is a 400 naming the field, the bound and the fix."""
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        async with httpx.AsyncClient(base_url=f"{fleet.api_url}/api/v1", timeout=30) as client:
            r = await client.post("/vms", params={"wait": 10}, json={"name": "web-1", "memory_mib": 256})
            assert r.status_code == 200, r.text
            for bad in (1e9, 0, -1):
                r = await client.post("/vms/web-1/stop", json={"timeout_s": bad})
                assert r.status_code == 400, r.text
                message = r.json()["error"]["message"]
                assert "timeout_s" in message and "3600" in message and "force=true" in message, message
            vm = fleet.ctl.store.vm("web-1")
            assert vm is not None and vm.state == "running" and vm.op_id is None, (
                "a refused stop changed nothing"
            )
            r = await client.post("/vms/web-1/stop", params={"wait": 10}, json={"timeout_s": 3600})
            assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
