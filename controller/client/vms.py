"""``client.vms``: list, show, create, the lifecycle actions, and live migration of VMs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import msgspec

from controller.client.transport import Transport
from protocols import rest
from protocols.migration import MigrationPolicy

VmList = list[rest.VmView]
Json = dict[str, Any]
#: A create body: the typed request, or the same fields as a mapping (sent as they are).
CreateBody = rest.CreateVmRequest | Mapping[str, Any]


class Vms:
    """The VMs of the fleet. Actions return the operation; ``wait`` holds the answer until it ends."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def list(self, selector: str = "", *, host: str | None = None) -> VmList:
        """Every VM, or those ``selector`` picks (docs/selectors.md), or those on ``host``."""
        return await self._t.call("GET", "/vms", VmList, params={"selector": selector or None, "host": host})

    async def get(self, name: str) -> rest.VmView:
        return await self._t.call("GET", f"/vms/{quote(name, safe='')}", rest.VmView)

    async def create(
        self, spec: CreateBody, *, start: bool = True, explain: bool = False, wait: float = 0.0
    ) -> rest.CreateVmResponse | rest.CreateBatchResponse:
        """Place and create a VM (a batch when ``count`` > 1, answered as ``CreateBatchResponse``).

        Raises ``Conflict`` (code ``no_valid_host``) with the scheduler's reason when no host can take it.
        """
        answer = await self._t.call(
            "POST", "/vms", Json, params={"start": start, "explain": explain or None, "wait": wait or None},
            body=spec,
        )  # fmt: skip
        if "vms" in answer:
            return msgspec.convert(answer, rest.CreateBatchResponse)
        return msgspec.convert(answer, rest.CreateVmResponse)

    async def plan(self, spec: CreateBody) -> rest.PlanResponse | rest.BatchPlanResponse:
        """Where ``spec`` would go and why (a batch is planned as a whole); nothing is claimed."""
        answer = await self._t.call("POST", "/vms", Json, params={"dry_run": True}, body=spec)
        if "vms" in answer:
            return msgspec.convert(answer, rest.BatchPlanResponse)
        return msgspec.convert(answer, rest.PlanResponse)

    async def update(self, name: str, *, labels: Mapping[str, str | None]) -> rest.VmView:
        """Set the VM's labels (a None value removes one); metadata only, so in any state.

        Raises ``InvalidRequest`` for a ``fleetvisor.io/`` key (the controller's own).
        """
        body = rest.VmUpdate(labels=dict(labels))
        return await self._t.call("PATCH", f"/vms/{quote(name, safe='')}", rest.VmView, body=body)

    async def start(self, name: str, *, wait: float = 0.0) -> rest.OperationView:
        return await self._action(name, "start", wait)

    async def stop(
        self, name: str, *, force: bool = False, timeout_s: float = 30.0, wait: float = 0.0
    ) -> rest.OperationView:
        """ACPI shutdown (powered off after ``timeout_s``), or power off at once with ``force``."""
        return await self._t.call(
            "POST",
            f"/vms/{quote(name, safe='')}/stop",
            rest.OperationView,
            params={"wait": wait or None},
            body=rest.StopRequest(force=force, timeout_s=timeout_s),
        )

    async def pause(self, name: str, *, wait: float = 0.0) -> rest.OperationView:
        return await self._action(name, "pause", wait)

    async def resume(self, name: str, *, wait: float = 0.0) -> rest.OperationView:
        return await self._action(name, "resume", wait)

    async def reboot(self, name: str, *, wait: float = 0.0) -> rest.OperationView:
        return await self._action(name, "reboot", wait)

    async def delete(self, name: str, *, wait: float = 0.0) -> rest.OperationView:
        """Stop the VM and delete it."""
        return await self._t.call(
            "DELETE", f"/vms/{quote(name, safe='')}", rest.OperationView, params={"wait": wait or None}
        )

    async def migrate(
        self,
        name: str,
        *,
        to: str | None = None,
        policy: MigrationPolicy | None = None,
        force: bool = False,
        reason: str = "",
        wait: float = 0.0,
    ) -> rest.OperationView:
        """Live-migrate a running VM to ``to`` (None: the scheduler's choice); ``force`` needs a ``reason``."""
        body = rest.MigrateRequest(to=to, policy=policy or MigrationPolicy(), force=force, reason=reason)
        return await self._t.call(
            "POST", f"/vms/{quote(name, safe='')}/migrate", rest.OperationView, params={"wait": wait or None},
            body=body,
        )  # fmt: skip

    async def plan_migration(
        self, name: str, *, to: str | None = None, policy: MigrationPolicy | None = None
    ) -> rest.MigrationPlan:
        """Where the VM would go and what the move would take (the link model's prediction)."""
        body = rest.MigrateRequest(to=to, policy=policy or MigrationPolicy())
        return await self._t.call(
            "POST", f"/vms/{quote(name, safe='')}/migrate", rest.MigrationPlan, params={"dry_run": True},
            body=body,
        )  # fmt: skip

    async def cancel_migration(self, name: str, *, wait: float = 0.0) -> rest.OperationView:
        """Cancel a migration before its switch-over; the VM stays on its source."""
        return await self._t.call(
            "POST", f"/vms/{quote(name, safe='')}/migrate/cancel", rest.OperationView,
            params={"wait": wait or None},
        )  # fmt: skip

    async def _action(self, name: str, action: str, wait: float) -> rest.OperationView:
        return await self._t.call(
            "POST", f"/vms/{quote(name, safe='')}/{action}", rest.OperationView, params={"wait": wait or None}
        )
