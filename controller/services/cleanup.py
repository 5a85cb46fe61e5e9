"""Removing stale copies: a host that still reports a VM which runs elsewhere is told to undefine it.

A copy goes stale when HA restarted its VM on another host, or when a migration left its source copy
(or a rolled-back destination copy) behind. Reconciliation finds them; this service removes them.
"""

from __future__ import annotations

import logging
import time
import uuid

from controller.common.tasks import TaskSet
from controller.services.agent_rpc import AgentRpc
from controller.state.events import EventHub
from controller.state.reconcile import StaleCopy
from protocols.messages import UndefineVm

log = logging.getLogger(__name__)


class StaleCopies:
    """Undefines stale copies on the hosts that still hold them."""

    def __init__(self, rpc: AgentRpc, events: EventHub) -> None:
        self.rpc = rpc
        self.events = events
        self._tasks = TaskSet("stale-copy clean-up")

    def remove(self, copy: StaleCopy) -> None:
        """Tell ``copy.host_id`` to undefine its copy of ``copy.vm`` (in the background)."""
        self.events.emit(
            "ha.stale_copy",
            f"vm {copy.vm} is reported by {copy.host_id}, but {copy.why}; undefining the stale copy",
            host_id=copy.host_id,
            vm=copy.vm,
        )
        command = UndefineVm(op_id=f"cleanup-{uuid.uuid4().hex}", deadline=time.time() + 30, vm=copy.vm)
        self._tasks.spawn(
            self.rpc.send(copy.host_id, command, expiry_s=30), name=f"cleanup:{copy.host_id}:{copy.vm}"
        )

    async def close(self) -> None:
        """Cancel clean-ups still being sent."""
        await self._tasks.close()
