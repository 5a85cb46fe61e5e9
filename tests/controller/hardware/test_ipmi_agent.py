"""End to end: a BMC whose power is a real fleetvisor agent, switched by IpmiDriver, watched on the bus.

ipmi_sim's power-on runs ``python -m fleetvisor agent`` against a real Mosquitto; the test sees the
agent come online on its state topic, and after a power-off sees it go offline and its PID gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt
import pytest

from controller.hardware import IpmiDriver
from protocols import codec, topics
from protocols.messages import HostState
from tests.controller.hardware.support import bmc_config
from tests.support.brokers import MosquittoBroker
from tests.support.ipmi import IpmiSim, pid_alive, require_ipmi, wait_until

HOST = "h-ipmi"


@pytest.fixture
def agent_bmc(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[IpmiSim]:
    """An ipmi_sim whose power-on starts a real agent for HOST on the test's Mosquitto."""
    require_ipmi()
    command = [sys.executable, "-m", "fleetvisor", "agent", "--host-id", HOST]
    command += ["--broker", mosquitto.url, "--state-dir", str(tmp_path / "agent")]
    sim = IpmiSim(tmp_path / "bmc", command, kill_wait_s=5)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()
        print(f"--- {sim!r} log (the agent's output too) ---\n{sim.log_tail()}")


@contextlib.asynccontextmanager
async def _host_states(url: str) -> AsyncIterator[asyncio.Queue[HostState]]:
    """HostState messages of HOST, as the broker delivers them, while the context is open."""
    parts = urlsplit(url)
    queue: asyncio.Queue[HostState] = asyncio.Queue(maxsize=100)
    decoder = codec.InboundDecoder()
    async with aiomqtt.Client(parts.hostname or "127.0.0.1", parts.port or 1883) as client:
        await client.subscribe(topics.host_topic(HOST, "state"), qos=1)

        async def pump() -> None:
            async for message in client.messages:
                if not isinstance(message.payload, bytes | bytearray):
                    continue
                decoded = decoder.decode(str(message.topic), bytes(message.payload))
                if isinstance(decoded, HostState):
                    queue.put_nowait(decoded)

        async with asyncio.TaskGroup() as tasks:
            pumping = tasks.create_task(pump(), name="host-states")
            try:
                yield queue
            finally:
                pumping.cancel()


async def _next_state(queue: asyncio.Queue[HostState], online: bool) -> HostState:
    async with asyncio.timeout(15):
        while True:
            state = await queue.get()
            if state.online == online:
                return state


async def test_ipmi_power_switches_a_real_agent_on_and_off(
    agent_bmc: IpmiSim, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Pins the issue's loop: IPMI power-on starts the host's agent (online on the bus), power-off stops it."""
    driver = IpmiDriver(bmc_config(agent_bmc, host_id=HOST))
    pid_file = tmp_path / "agent" / "agent.pid"

    async with _host_states(mosquitto.url) as states:
        await driver.power_on()
        online = await _next_state(states, online=True)
        assert online.host_id == HOST
        await asyncio.to_thread(wait_until, pid_file.exists, 10, "the agent's pid file")
        pid = int(pid_file.read_text().split()[0])
        assert agent_bmc.started_pids() == [pid]

        await driver.power_off()
        offline = await _next_state(states, online=False)

    await asyncio.to_thread(wait_until, lambda: not pid_alive(pid), 10, f"agent pid {pid} to exit")
    assert offline.reason == "agent stopped", "SIGTERM from the BMC must let the agent say goodbye"
    assert await driver.status() == "off"
    assert await asyncio.to_thread(agent_bmc.power_via_ipmitool) == "off"
