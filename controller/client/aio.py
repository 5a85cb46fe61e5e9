"""``AsyncClient``: the asyncio client of the controller's REST API and event stream.

    async with AsyncClient.from_env() as fv:
        for vm in await fv.vms.list("tier=web,state=running"):
            op = await fv.vms.stop(vm.name, wait=60)

Its resources are attributes: ``vms``, ``hosts``, ``operations``, ``actions`` (bulk), ``rolling``,
``events``, ``power``, ``tokens`` and ``audit``. Answers are the typed Structs of
:mod:`protocols.rest`; failures are :mod:`controller.client.errors`.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

from controller.client.actions import Actions, Rolling
from controller.client.admin import Audit, Power, Tokens, health
from controller.client.events import Events
from controller.client.hosts import Hosts
from controller.client.operations import Operations
from controller.client.transport import DEFAULT_URL, Transport
from controller.client.vms import Vms


class AsyncClient:
    """One controller: its URL, token and CA; one connection pool shared by every resource."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        verbose: bool = False,
    ) -> None:
        """Raises ``OSError`` or ``ssl.SSLError`` when ``ca_file`` cannot be read as a CA certificate."""
        self.transport = Transport(
            url, token=token, ca_file=ca_file, timeout=timeout, retries=retries, verbose=verbose
        )
        self.url = self.transport.url
        self.vms = Vms(self.transport)
        self.hosts = Hosts(self.transport)
        self.operations = Operations(self.transport)
        self.actions = Actions(self.transport)
        self.rolling = Rolling(self.transport)
        self.events = Events(self.transport)
        self.power = Power(self.transport)
        self.tokens = Tokens(self.transport)
        self.audit = Audit(self.transport)

    @classmethod
    def from_env(cls, **kwargs: Any) -> AsyncClient:
        """A client configured as the CLI is: ``FLEETVISOR_URL``, ``FLEETVISOR_TOKEN``, ``FLEETVISOR_CA``."""
        return cls(**{**_env(), **kwargs})

    async def health(self) -> dict[str, Any]:
        return await health(self.transport)

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _env() -> dict[str, Any]:
    return {
        "url": os.environ.get("FLEETVISOR_URL") or DEFAULT_URL,
        "token": os.environ.get("FLEETVISOR_TOKEN") or None,
        "ca_file": os.environ.get("FLEETVISOR_CA") or None,
    }
