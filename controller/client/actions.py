"""``client.actions`` and ``client.rolling``: one action on everything a selector picks, and rolling
maintenance of the hosts it picks. Both run as one parent operation (docs/operations.md), which
:class:`~controller.client.operations.Operations` follows, waits for and cancels.
"""

from __future__ import annotations

import msgspec

from controller.client.transport import Transport
from protocols import rest


class Actions:
    """``POST /actions``: start, stop, pause, resume, reboot, delete, migrate or label VMs;
    maintenance, label or power on hosts.
    """

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def start(self, request: rest.BulkRequest, *, wait: float = 0.0) -> rest.OperationView:
        """Start the bulk action; its ``params["results"]`` fill in target by target."""
        if request.dry_run:
            raise ValueError("a dry run is plan(), not start(): it starts nothing")
        return await self._t.call("POST", "/actions", rest.OperationView, params={"wait": wait or None},
                                  body=request)  # fmt: skip

    async def plan(self, request: rest.BulkRequest) -> rest.BulkPlan:
        """What the action would act on, in order; nothing is started."""
        body = msgspec.structs.replace(request, dry_run=True)
        return await self._t.call("POST", "/actions", rest.BulkPlan, body=body)


class Rolling:
    """``POST /rolling-maintenance``: the hosts a selector picks through maintenance, a wave at a time."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def start(self, request: rest.RollingRequest, *, wait: float = 0.0) -> rest.OperationView:
        """Start the roll; with ``step="continue"`` each host waits for ``operations.continue_host``."""
        if request.dry_run:
            raise ValueError("a dry run is plan(), not start(): it starts nothing")
        return await self._t.call("POST", "/rolling-maintenance", rest.OperationView,
                                  params={"wait": wait or None}, body=request)  # fmt: skip

    async def plan(self, request: rest.RollingRequest) -> rest.RollingPlan:
        """The hosts, wave by wave, in the order the roll would take them; nothing is started."""
        body = msgspec.structs.replace(request, dry_run=True)
        return await self._t.call("POST", "/rolling-maintenance", rest.RollingPlan, body=body)
