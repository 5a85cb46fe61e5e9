"""The agent's side of HA fencing: HA VMs destroyed when the controller may restart them elsewhere.

- At start, a ``fenced`` marker in the state directory (left by a fence while the agent was away)
  means the host's HA VMs died with it: any still running are destroyed.
- With ``--ha-lease``, HA VMs are destroyed after the lease passes without the bus: the controller,
  which fences by lease, restarts them elsewhere only after the same lease plus a margin.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections.abc import Callable

from hv.driver import Driver
from protocols.bus import Bus

log = logging.getLogger(__name__)

#: ``report(vm, state, reason)``: tell the controller a VM was stopped by the fence.
Report = Callable[[str, str, str], None]


class SelfFence:
    def __init__(self, host_id: str, driver: Driver, report: Report, state_dir: pathlib.Path | None) -> None:
        self.host_id = host_id
        self.driver = driver
        self.report = report
        self.state_dir = state_dir

    async def honour_marker(self) -> None:
        """At start: if the host was fenced while this agent was away, its HA VMs died with it."""
        marker = self.state_dir / "fenced" if self.state_dir else None
        if marker is not None and marker.exists():
            await self.fence("the host was fenced while the agent was away")
            marker.unlink()

    async def fence(self, reason: str) -> list[str]:
        """Destroy every running HA VM (the controller may restart it elsewhere). Returns their names."""
        fenced = []
        for vm in await self.driver.list():
            if vm.spec.ha and vm.state in ("running", "paused", "starting"):
                status = await self.driver.destroy(vm.name)
                self.report(vm.name, status.state, f"self-fenced: {reason}")
                fenced.append(vm.name)
        if fenced:
            log.warning("agent %s: self-fenced HA VMs %s: %s", self.host_id, ", ".join(fenced), reason)
        return fenced

    async def lease_loop(self, bus: Bus, lease_s: float) -> None:
        """Opt-in (``--ha-lease``): destroy HA VMs after ``lease_s`` without the bus."""
        lost_since: float | None = time.monotonic()
        fenced = False
        while True:
            await asyncio.sleep(min(0.25, lease_s / 4))
            now = time.monotonic()
            if bus.connected.is_set():
                lost_since, fenced = None, False
            else:
                lost_since = lost_since if lost_since is not None else now
                if not fenced and now - lost_since >= lease_s:
                    fenced = True
                    await self.fence(f"lost the bus for {now - lost_since:.1f}s (HA lease {lease_s:g}s)")
