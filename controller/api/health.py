"""The route of ``/health``: is the controller up, connected, and hearing its hosts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from controller.api.http import PREFIX, json_response


def router(health: Callable[[], dict[str, Any]]) -> APIRouter:
    """The health route; ``health`` gathers the figures (the daemon knows where they live)."""
    api = APIRouter()

    @api.get(f"{PREFIX}/health", summary="Controller health")
    async def show_health() -> Response:
        return json_response({"status": "ok", **health()})

    return api
