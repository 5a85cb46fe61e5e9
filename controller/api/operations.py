"""Routes of ``/operations`` (list with filters and paging, show, cancel), and the one way every
route answers with an operation.
"""

from __future__ import annotations

from typing import get_args

from fastapi import APIRouter, Query
from fastapi.responses import Response

from controller.api import views
from controller.api.http import PREFIX, WAIT, ApiError, json_response, responses
from controller.common.errors import Conflict
from controller.services.bulk import BulkActions
from controller.services.migration.evacuation import Evacuations
from controller.services.migration.migrate import MigrationService
from controller.services.operations import Operations
from controller.services.rolling import RollingMaintenance
from controller.state.records import OpKind, OpState
from protocols import rest


class OperationResponses:
    """Answers with an operation: after waiting up to ``wait`` seconds, with any live migration progress."""

    def __init__(self, operations: Operations, migrations: MigrationService) -> None:
        self.operations = operations
        self.migrations = migrations

    async def respond(self, op_id: str, wait: float) -> Response:
        """202 while the operation runs, 200 once it ended."""
        op = await self.operations.wait(op_id, wait) if wait else self.operations.require(op_id)
        view = views.operation_view(op, self.migrations.progress.get(op.op_id))
        return json_response(view, 202 if op.state == "running" else 200)


def router(
    ops: OperationResponses, evacuations: Evacuations, bulk: BulkActions, rolling: RollingMaintenance
) -> APIRouter:
    """The operation routes."""
    api = APIRouter()
    store = ops.operations.store

    @api.get(
        f"{PREFIX}/operations",
        summary="List operations, newest first, with filters and paging",
        responses=responses(200, "operations", 400),
    )
    async def list_operations(
        kind: str | None = Query(None, description=f"one of: {', '.join(get_args(OpKind))}"),
        state: str | None = Query(None, description=f"one of: {', '.join(get_args(OpState))}"),
        host: str | None = Query(None, max_length=64, description="the operation's host"),
        vm: str | None = Query(None, max_length=64, description="the operation's VM"),
        parent: str | None = Query(None, max_length=64, description="started by this bulk action"),
        since: float | None = Query(None, ge=0.0, description="created at or after this time (Unix seconds)"),
        limit: int = Query(100, ge=1, le=1000, description="operations per page"),
        page: str | None = Query(None, max_length=200, description="the `next` of the previous page"),
    ) -> Response:
        for name, value, allowed in (("kind", kind, get_args(OpKind)), ("state", state, get_args(OpState))):
            if value is not None and value not in allowed:
                raise ApiError(
                    400,
                    "invalid_filter",
                    f"{name} {value!r} is not one of: {', '.join(allowed)}",
                    {"field": name},
                )
        equal = {
            k: v
            for k, v in (("kind", kind), ("state", state), ("host_id", host), ("vm", vm), ("parent", parent))
            if v is not None
        }
        rows = store.operations_page(limit=limit + 1, before=_cursor(page), since=since, **equal)
        more = len(rows) > limit
        rows = rows[:limit]
        following = f"{rows[-1].created_at!r}:{rows[-1].op_id}" if more and rows else None
        page_view = rest.OperationPage(
            operations=[views.operation_view(op, ops.migrations.progress.get(op.op_id)) for op in rows],
            next=following,
        )
        return json_response(page_view)

    @api.get(
        f"{PREFIX}/operations/{{op_id}}",
        summary="Show an operation",
        responses=responses(200, "operation", 404),
    )
    async def show_operation(op_id: str, wait: float = WAIT) -> Response:
        return await ops.respond(op_id, wait)

    @api.post(
        f"{PREFIX}/operations/{{op_id}}/cancel",
        summary="Cancel a running operation (a live migration while pre-copy, an evacuation, a bulk action, a roll)",
        responses=responses(200, "operation", 404, 409),
    )
    async def cancel_operation(op_id: str, wait: float = WAIT) -> Response:
        op = ops.operations.require(op_id)
        if op.state != "running":
            raise Conflict(
                "invalid_state", f"operation {op_id} already {op.state}; there is nothing to cancel"
            )
        if op.kind == "evacuate":
            return await ops.respond(evacuations.cancel(op_id).op_id, wait)
        if op.kind == "bulk":
            return await ops.respond((await bulk.cancel(op_id)).op_id, wait)
        if op.kind == "rolling":
            return await ops.respond(rolling.cancel(op_id).op_id, wait)
        if op.kind != "migrate":
            raise Conflict(
                "not_cancellable",
                f"operation {op_id} ({op.kind} of {op.vm}) cannot be cancelled: the host applies a {op.kind} "
                "as one step, so it ends on its own (wait for it, then undo it if needed). Live migrations "
                "evacuations, bulk actions and rolling maintenance can be cancelled",
            )
        return await ops.respond((await ops.migrations.cancel(op.vm)).op_id, wait)

    return api


def _cursor(page: str | None) -> tuple[float, str] | None:
    """The (created_at, op_id) a page continues after."""
    if page is None:
        return None
    created, _, op_id = page.partition(":")
    try:
        return float(created), op_id
    except ValueError:
        raise ApiError(
            400,
            "invalid_page",
            f"page {page!r} is not a `next` value of this API; start without it",
            {"field": "page"},
        ) from None
