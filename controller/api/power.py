"""Routes of the power service: the plan, its execution, the automation level, and host power."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from controller.api.http import PREFIX, body, json_response, read_body, responses
from controller.services import power
from protocols import rest


def router(service: power.PowerService) -> APIRouter:
    """The power routes."""
    api = APIRouter()

    @api.get(
        f"{PREFIX}/plan",
        summary="The power manager's current recommendation: moves and power actions, each with its reason",
        responses=responses(200, "power_plan"),
    )
    async def show_plan() -> Response:
        return json_response(service.current_plan())

    @api.post(
        f"{PREFIX}/plan/apply",
        summary="Execute the current recommendation once (automation levels manual and recommend)",
        responses=responses(200, "plan_outcome", 409),
    )
    async def apply_plan() -> Response:
        return json_response(await service.apply())

    @api.get(
        f"{PREFIX}/power",
        summary="The power manager: automation level, settings, each host's power and energy",
        responses=responses(200, "power_status"),
    )
    async def show_power() -> Response:
        return json_response(service.status())

    @api.put(
        f"{PREFIX}/power/mode",
        summary="Switch the power manager's automation level (manual, recommend, auto)",
        responses=responses(200, "power_status", 400),
        openapi_extra=body("power_mode"),
    )
    async def set_power_mode(request: Request) -> Response:
        asked: rest.ModeRequest = await read_body(request, rest.ModeRequest, "power mode")
        service.set_mode(asked.mode)
        return json_response(service.status())

    @api.get(
        f"{PREFIX}/hosts/{{host_id}}/power",
        summary="A host's power as its methods read it, and whether its wake path verifies",
        responses=responses(200, "host_power", 404, 409),
    )
    async def host_power_status(host_id: str) -> Response:
        return json_response(await service.host_status(host_id))

    @api.post(
        f"{PREFIX}/hosts/{{host_id}}/power",
        summary="Power a host on, or put an empty host in standby (off), through its power methods",
        responses=responses(200, "host_power", 400, 404, 409, 502),
        openapi_extra=body("host_power_request"),
    )
    async def host_power_action(request: Request, host_id: str) -> Response:
        asked: rest.HostPowerRequest = await read_body(request, rest.HostPowerRequest, "host power request")
        return json_response(await service.host_action(host_id, asked.action))

    return api
