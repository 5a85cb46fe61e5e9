"""In-process fleets for tests: a controller and sim agents on a real broker.

``async with Fleet(broker_url, tmp_path) as fleet`` starts a controller (API on a free port) and
lets tests add agents (``await fleet.add_agent("h1")``), restart the controller on the same store,
and wait for conditions with a bounded poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Self

import httpx

from agent.daemon import Agent, AgentSettings
from controller.daemon import Controller, ControllerSettings, FleetSettings
from hv.sim.driver import SimDriver

FAST_BUS = {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "keepalive_s": 2}


async def eventually(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class Fleet:
    def __init__(
        self,
        broker_url: str,
        root: pathlib.Path,
        *,
        fleet_settings: FleetSettings | None = None,
        serve_api: bool = True,
        enrolment: Literal["operator", "open"] = "open",
    ) -> None:
        self.broker_url = broker_url
        self.root = root
        #: Applied at each controller start, also to settings a test replaces meanwhile: hosts of a
        #: test fleet simply join, unless a test is about enrolment itself.
        self.enrolment = enrolment
        self.fleet_settings = fleet_settings or FleetSettings()
        self.serve_api = serve_api
        self.controller: Controller | None = None
        self.agents: dict[str, Agent] = {}
        self.drivers: dict[str, SimDriver] = {}

    @property
    def ctl(self) -> Controller:
        """The running controller (its parts are attributes: ``ctl.store``, ``ctl.vms``...)."""
        assert self.controller is not None
        return self.controller

    @property
    def api_url(self) -> str:
        assert self.controller is not None
        return self.controller.api_url

    async def start_controller(self) -> Controller:
        settings = ControllerSettings(
            broker_url=self.broker_url,
            db_path=self.root / "controller.sqlite",
            api_port=0,
            serve_api=self.serve_api,
            fleet=dataclasses.replace(
                self.fleet_settings,
                hosts=dataclasses.replace(self.fleet_settings.hosts, enrolment=self.enrolment),
            ),
            bus_overrides=FAST_BUS,
        )
        self.controller = Controller(settings)
        await self.controller.__aenter__()
        assert self.controller.bus is not None
        await self.controller.bus.wait_connected(10)
        return self.controller

    async def stop_controller(self) -> None:
        if self.controller is not None:
            await self.controller.__aexit__(None, None, None)
            self.controller = None

    async def add_agent(self, host_id: str, *, wait: bool = True, join_token: str = "", **sim: Any) -> Agent:
        driver = SimDriver(host_id=host_id, state_dir=self.root / host_id, **sim)
        agent = Agent(
            AgentSettings(
                host_id=host_id,
                broker_url=self.broker_url,
                state_dir=self.root / host_id,
                telemetry_interval_s=0.2,
                bus_overrides=FAST_BUS,
                join_token=join_token,
            ),
            driver,
        )
        await agent.__aenter__()
        self.agents[host_id] = agent
        self.drivers[host_id] = driver
        if wait and self.controller is not None:
            await eventually(
                lambda: (h := self.ctl.store.host(host_id)) is not None and h.online,
                10,
                f"host {host_id} online",
            )
        return agent

    async def stop_agent(self, host_id: str) -> None:
        agent = self.agents.pop(host_id)
        self.drivers.pop(host_id)
        await agent.shutdown()

    async def __aenter__(self) -> Self:
        await self.start_controller()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for host_id in list(self.agents):
            with contextlib.suppress(Exception):
                await self.stop_agent(host_id)
        await self.stop_controller()


async def create_vm(client: httpx.AsyncClient, name: str, host: str, labels: dict[str, str]) -> None:
    """Create and start a 256 MiB VM ``name`` with ``labels`` on ``host`` through the API."""
    body: dict[str, Any] = {
        "name": name,
        "memory_mib": 256,
        "labels": labels,
        "scheduling": {"start_on": host},
    }
    r = await client.post("/api/v1/vms", json=body, params={"wait": 10})
    assert r.status_code == 200, r.text
