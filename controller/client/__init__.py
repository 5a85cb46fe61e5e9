"""The Python client of the controller: typed, async first, with a blocking twin. The CLI is built on it.

    from controller.client import Client, Conflict

    with Client.from_env() as fv:                      # FLEETVISOR_URL, FLEETVISOR_TOKEN, FLEETVISOR_CA
        for host in fv.hosts.list("rack=3"):
            print(host.host_id, host.free_memory_mib)

:class:`AsyncClient` (``async with``, ``await``) and :class:`Client` (plain calls) have the same
resources and methods; answers are the Structs of :mod:`protocols.rest`, the API's own contract;
failures are the :class:`ApiError` family, whose message is what the CLI prints. Mutating requests
carry an ``Idempotency-Key`` and are retried when that is safe. docs/client.md has the guide and
three example scripts.

Layering: it imports ``protocols`` and third-party packages only, nothing else of ``controller``
(an import-linter contract): a script that imports it loads no server code.
"""

from __future__ import annotations

from controller.client.aio import AsyncClient
from controller.client.errors import (
    ApiError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NoAnswer,
    NotFound,
    OperationFailed,
    Unauthorized,
    Unreachable,
)
from controller.client.sync import Client
from controller.client.transport import DEFAULT_URL

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "AsyncClient",
    "Client",
    "Conflict",
    "Forbidden",
    "InvalidRequest",
    "NoAnswer",
    "NotFound",
    "OperationFailed",
    "Unauthorized",
    "Unreachable",
]
