"""Sim power for in-process fleets: a power driver whose "power" is a sim agent in the test's process.

:class:`AgentPower` is a :class:`~controller.hardware.SimPowerDriver` (so failures can be injected the
same way) that also does what cutting a real host's power does: ``power_off`` stops the host's agent
(it says goodbye on the bus, as an agent under SIGTERM does), and ``power_on`` starts a new agent for
the host on the same state directory (a new boot, so a new ``boot_id``). The power manager cannot tell
it from a BMC.
"""

from __future__ import annotations

from typing import Any

from controller.hardware import SimPowerDriver
from tests.support.fleet import Fleet


class AgentPower(SimPowerDriver):
    """Sim power that stops and starts the host's in-process agent (see the module docstring)."""

    def __init__(
        self, fleet: Fleet, host_id: str, *, sim: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(host_id, **kwargs)
        self.fleet = fleet
        #: The sim host's settings (cores, memory...) for the agent a power-on starts.
        self.sim = dict(sim or {})

    async def power_off(self, soft: bool = False) -> None:
        await super().power_off(soft)
        if self.host_id in self.fleet.agents:
            await self.fleet.stop_agent(self.host_id)

    async def power_on(self) -> None:
        await super().power_on()
        if self.host_id not in self.fleet.agents:
            await self.fleet.add_agent(self.host_id, wait=False, **self.sim)
