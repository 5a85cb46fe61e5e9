"""Routes of a VM's live migration: start (or predict with dry_run) and cancel."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from controller.api.http import PREFIX, WAIT, body, json_response, read_body, responses
from controller.api.operations import OperationResponses
from controller.services.migration.migrate import MigrationService
from protocols import rest


def router(migrations: MigrationService, ops: OperationResponses) -> APIRouter:
    """The migration routes."""
    api = APIRouter()

    @api.post(
        f"{PREFIX}/vms/{{name}}/migrate",
        summary="Live-migrate a running VM (or, with dry_run, predict the migration)",
        status_code=202,
        responses=responses(202, "operation", 400, 404, 409),
        openapi_extra=body("migrate", required=False),
    )
    async def migrate_vm(
        request: Request,
        name: str,
        wait: float = WAIT,
        dry_run: bool = Query(False, description="only choose the target and predict; change nothing"),
    ) -> Response:
        asked: rest.MigrateRequest = await read_body(
            request, rest.MigrateRequest, "migrate request", required=False
        )
        if dry_run:
            return json_response(migrations.plan(name, asked.to, asked.policy))
        started = migrations.start(name, asked.to, asked.policy, force=asked.force, reason=asked.reason)
        return await ops.respond(started.op_id, wait)

    @api.post(
        f"{PREFIX}/vms/{{name}}/migrate/cancel",
        summary="Cancel a VM's migration before the switch-over (it stays on its source)",
        status_code=202,
        responses=responses(202, "operation", 404, 409),
    )
    async def cancel_migration(name: str, wait: float = WAIT) -> Response:
        return await ops.respond((await migrations.cancel(name)).op_id, wait)

    return api
