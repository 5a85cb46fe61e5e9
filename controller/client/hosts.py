"""``client.hosts``: list, show, label, maintenance, evacuation, fencing, enrolment and power of hosts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import quote

from controller.client.transport import Transport
from protocols import rest
from protocols.migration import MigrationPolicy

HostList = list[rest.HostView]
PendingList = list[rest.PendingHost]


class Hosts:
    """The hosts of the fleet."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def list(self, selector: str = "") -> HostList:
        """Every host, or those ``selector`` picks (labels, ``name``, ``state``: docs/selectors.md)."""
        return await self._t.call("GET", "/hosts", HostList, params={"selector": selector or None})

    async def get(self, host: str) -> rest.HostView:
        return await self._t.call("GET", _path(host), rest.HostView)

    async def update(
        self,
        host: str,
        *,
        labels: Mapping[str, str | None] | None = None,
        maintenance: bool | None = None,
        force: bool = False,
    ) -> rest.HostView:
        """Set operator labels (a None value removes one) and the maintenance flag.

        Entering maintenance only flags the host (no new VMs go there); :meth:`evacuate` moves its
        VMs. ``force`` enters it even when this is the last host with room for the fleet's HA VMs.
        """
        body = rest.HostUpdate(
            labels=dict(labels) if labels is not None else None, maintenance=maintenance, force=force
        )
        return await self._t.call("PATCH", _path(host), rest.HostView, body=body)

    async def evacuate(
        self, host: str, *, policy: MigrationPolicy | None = None, wait: float = 0.0
    ) -> rest.OperationView:
        """Live-migrate every running VM off ``host``, placed as a whole, in waves."""
        return await self._t.call(
            "POST", f"{_path(host)}/evacuate", rest.OperationView, params={"wait": wait or None},
            body=rest.EvacuateRequest(policy=policy or MigrationPolicy()),
        )  # fmt: skip

    async def confirm_down(self, host: str) -> rest.ConfirmDownResponse:
        """The operator's word that ``host`` is off: it is fenced and HA restarts its HA VMs."""
        return await self._t.call("POST", f"{_path(host)}/confirm-down", rest.ConfirmDownResponse)

    async def forget(self, host: str) -> rest.ForgetResponse:
        """Remove a host that is gone for good, with the records of its VMs."""
        return await self._t.call("DELETE", _path(host), rest.ForgetResponse)

    async def pending(self) -> PendingList:
        """Hosts that asked to join and wait to be accepted."""
        return await self._t.call("GET", "/hosts/pending", PendingList)

    async def accept(self, host: str) -> rest.AcceptedHost:
        return await self._t.call("POST", f"{_path(host)}/accept", rest.AcceptedHost)

    async def join_token(self, host: str = "", *, ttl_s: float = 3600.0) -> rest.JoinToken:
        """A one-time token a new agent presents to enrol (for ``host``, or any new host id)."""
        body = rest.JoinTokenRequest(host_id=host, ttl_s=ttl_s)
        return await self._t.call("POST", "/tokens/join", rest.JoinToken, body=body)

    async def power(self, host: str) -> rest.HostPowerReport:
        """The host's power as its methods read it, and its wake path."""
        return await self._t.call("GET", f"{_path(host)}/power", rest.HostPowerReport)

    async def set_power(self, host: str, action: Literal["on", "off"]) -> rest.HostPowerReport:
        """Power a host on, or put it in standby (``off``: it must be empty, its wake path verified)."""
        body = rest.HostPowerRequest(action=action)
        return await self._t.call("POST", f"{_path(host)}/power", rest.HostPowerReport, body=body)


def _path(host: str) -> str:
    return f"/hosts/{quote(host, safe='')}"
