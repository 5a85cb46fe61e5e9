"""Route of ``/actions``: one action on every VM or host a selector picks (a bulk operation)."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response

from controller.api.http import PREFIX, WAIT, body, json_response, read_body, responses
from controller.api.operations import OperationResponses
from controller.common.errors import Invalid
from controller.services.bulk import VM_ACTIONS, BulkActions, target_kind
from protocols import rest


def router(bulk: BulkActions, ops: OperationResponses) -> APIRouter:
    """The bulk action route."""
    api = APIRouter()

    @api.post(
        f"{PREFIX}/actions",
        summary="Run one action on every VM or host a selector picks, as one parent operation",
        status_code=202,
        responses=responses(202, "operation", 400, 409),
        openapi_extra=body("bulk_request"),
    )
    async def start_action(request: Request, wait: float = WAIT) -> Response:
        asked: rest.BulkRequest = await read_body(request, rest.BulkRequest, "bulk action")
        if asked.dry_run:
            targets = bulk.targets(asked.action, asked.selector, asked.kind)
            return json_response(rest.BulkPlan(action=asked.action, selector=asked.selector, targets=targets))
        args: dict[str, Any]
        if asked.action == "maintenance":
            args = {"on": asked.on, "force": asked.force}
        elif asked.action == "power":
            args = {"on": asked.on}
        elif asked.action == "label":
            if not asked.labels:
                raise Invalid(
                    "invalid_labels",
                    'action label needs "labels": {"KEY": "VALUE"} sets one, {"KEY": null} removes it',
                )
            args = {"labels": dict(asked.labels), "kind": target_kind("label", asked.kind)}
        elif asked.action in VM_ACTIONS:
            args = {"force": asked.force, "timeout_s": asked.timeout_s, "to": asked.to}
            if asked.policy is not None:
                args["policy"] = msgspec.to_builtins(asked.policy)
        else:
            args = {}
        target_kind(asked.action, asked.kind)  # a kind that does not fit the action is a 400
        op = bulk.start(
            asked.action,
            asked.selector,
            max_parallel=asked.max_parallel,
            stop_after=asked.stop_after,
            args=args,
        )
        return await ops.respond(op.op_id, wait)

    return api
