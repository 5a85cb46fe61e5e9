"""``client.power``, ``client.tokens`` and ``client.audit``: the power manager, API tokens and the audit log."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from controller.client.transport import Transport
from protocols import rest

TokenList = list[rest.TokenInfo]
AuditList = list[rest.AuditRecord]


class Power:
    """The power manager: its automation level, its plan, and executing that plan once."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def status(self) -> rest.PowerStatus:
        return await self._t.call("GET", "/power", rest.PowerStatus)

    async def set_mode(self, mode: rest.AutomationLevel) -> rest.PowerStatus:
        """``manual`` (plan when asked), ``recommend`` (plan every round) or ``auto`` (act on it)."""
        return await self._t.call("PUT", "/power/mode", rest.PowerStatus, body=rest.ModeRequest(mode=mode))

    async def plan(self) -> rest.Plan:
        """The moves and power actions the manager recommends now, each with its reason."""
        return await self._t.call("GET", "/plan", rest.Plan)

    async def apply(self, *, timeout: float = 600.0) -> rest.PlanOutcome:
        """Execute the plan once and return what became of each step."""
        return await self._t.call("POST", "/plan/apply", rest.PlanOutcome, timeout=timeout)


class Tokens:
    """API tokens (admin): a token's secret is shown once, when it is made."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def create(self, name: str, role: rest.Role = "viewer") -> rest.NewToken:
        body = rest.TokenRequest(name=name, role=role)
        return await self._t.call("POST", "/tokens", rest.NewToken, body=body)

    async def list(self) -> TokenList:
        return await self._t.call("GET", "/tokens", TokenList)

    async def revoke(self, name: str) -> None:
        await self._t.call("DELETE", f"/tokens/{quote(name, safe='')}", type(None))


class Audit:
    """The audit log of mutating requests (admin)."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def list(self, since: int = 0, *, limit: int = 1000) -> AuditList:
        return await self._t.call("GET", "/audit", AuditList, params={"since": since, "limit": limit})


async def health(transport: Transport) -> dict[str, Any]:
    """``/health``: the controller's own view of itself (free-form: its parts report what they know)."""
    answer: dict[str, Any] = await transport.call("GET", "/health", dict[str, Any])
    return answer
