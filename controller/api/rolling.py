"""Routes of rolling maintenance: start a roll over the hosts a selector picks, and continue a host
whose operator step is over (docs/operations.md).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from controller.api.http import PREFIX, WAIT, body, json_response, read_body, responses
from controller.api.operations import OperationResponses
from controller.services.rolling import RollingMaintenance
from protocols import rest


def router(rolling: RollingMaintenance, ops: OperationResponses) -> APIRouter:
    """The rolling maintenance routes."""
    api = APIRouter()

    @api.post(
        f"{PREFIX}/rolling-maintenance",
        summary="Take the hosts a selector picks through maintenance in turn, a wave at a time",
        status_code=202,
        responses=responses(202, "operation", 400, 409),
        openapi_extra=body("rolling_request"),
    )
    async def start_rolling(request: Request, wait: float = WAIT) -> Response:
        asked: rest.RollingRequest = await read_body(request, rest.RollingRequest, "rolling maintenance")
        if asked.dry_run:
            hosts = rolling.targets(asked.selector)
            size = asked.max_parallel
            waves = [hosts[i : i + size] for i in range(0, len(hosts), size)]
            return json_response(rest.RollingPlan(selector=asked.selector, waves=waves))
        op = rolling.start(
            asked.selector,
            max_parallel=asked.max_parallel,
            return_vms=asked.return_vms,
            step=asked.step,
            agent_timeout_s=asked.agent_timeout_s,
            policy=asked.policy,
        )
        return await ops.respond(op.op_id, wait)

    @api.post(
        f"{PREFIX}/operations/{{op_id}}/continue",
        summary="The operator's step on a host of a rolling maintenance is over (or failed)",
        responses=responses(200, "operation", 400, 404, 409),
        openapi_extra=body("continue_request"),
    )
    async def continue_rolling(op_id: str, request: Request) -> Response:
        asked: rest.ContinueRequest = await read_body(request, rest.ContinueRequest, "continue")
        rolling.proceed(op_id, asked.host, asked.ok, asked.message)
        return await ops.respond(op_id, 0.0)

    return api
