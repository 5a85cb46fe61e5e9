"""Routes of ``/operations``, and the one way every route answers with an operation."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from controller.api import views
from controller.api.http import PREFIX, WAIT, json_response, responses
from controller.services.migration.migrate import MigrationService
from controller.services.operations import Operations


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


def router(ops: OperationResponses) -> APIRouter:
    """The operation routes."""
    api = APIRouter()

    @api.get(
        f"{PREFIX}/operations/{{op_id}}",
        summary="Show an operation",
        responses=responses(200, "operation", 404),
    )
    async def show_operation(op_id: str, wait: float = WAIT) -> Response:
        return await ops.respond(op_id, wait)

    return api
