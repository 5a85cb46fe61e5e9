"""Routes of ``/vms``: create (with dry-run and explain), show, list, and the lifecycle actions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from controller.api import views
from controller.api.http import PREFIX, WAIT, ApiError, body, json_response, read_body, responses
from controller.api.operations import OperationResponses
from controller.api.views import SELECTOR_HELP
from controller.common import selectors
from controller.scheduler import Explanation
from controller.services.operations import Operations
from controller.services.selection import select_vms
from controller.services.vms import VmService, refusal_error
from controller.state.store import OperationRecord, Store, VmRecord
from protocols import rest
from protocols.messages import MAX_STOP_TIMEOUT_S


def router(
    store: Store, vms: VmService, operations: Operations, view: views.Views, ops: OperationResponses
) -> APIRouter:
    """The VM routes."""
    api = APIRouter()

    @api.get(f"{PREFIX}/vms", summary="List VMs", responses=responses(200, "vms"))
    async def list_vms(
        host: str | None = Query(None, description="only VMs on this host"),
        selector: str = Query("", description=SELECTOR_HELP),
    ) -> Response:
        chosen = selectors.parse(selector, "vm")  # a bad one is a 400 pointing at the character
        online = {h.host_id: h.online for h in store.hosts()}
        return json_response([view.vm(vm, online) for vm in select_vms(chosen, store.vms(host))])

    _create_route(api, store, vms, operations, view)

    @api.get(f"{PREFIX}/vms/{{name}}", summary="Show a VM", responses=responses(200, "vm", 404))
    async def show_vm(name: str) -> Response:
        return json_response(view.vm(vms.require(name)))

    @api.patch(
        f"{PREFIX}/vms/{{name}}",
        summary="Set or remove a VM's labels (metadata: no operation, allowed in any state)",
        responses=responses(200, "vm", 400, 404),
        openapi_extra=body("vm_update"),
    )
    async def update_vm(request: Request, name: str) -> Response:
        asked: rest.VmUpdate = await read_body(request, rest.VmUpdate, "vm update")
        return json_response(view.vm(vms.labels.update(name, dict(asked.labels))))

    _lifecycle_routes(api, vms, ops)

    @api.post(
        f"{PREFIX}/vms/{{name}}/stop",
        summary="Stop a VM (graceful, or forced with force=true)",
        status_code=202,
        responses=responses(202, "operation", 400, 404, 409),
        openapi_extra=body("stop", required=False),
    )
    async def stop_vm(request: Request, name: str, wait: float = WAIT) -> Response:
        asked: rest.StopRequest = await read_body(request, rest.StopRequest, "stop request", required=False)
        _check_stop_timeout(asked.timeout_s)
        return await ops.respond(vms.stop(name, force=asked.force, timeout_s=asked.timeout_s).op_id, wait)

    @api.delete(
        f"{PREFIX}/vms/{{name}}",
        summary="Delete a VM",
        status_code=202,
        responses=responses(202, "operation", 404, 409),
    )
    async def delete_vm(name: str, wait: float = WAIT) -> Response:
        return await ops.respond(vms.delete(name).op_id, wait)

    return api


def _check_stop_timeout(timeout_s: float) -> None:
    """Refuse a graceful-stop timeout the agent's ShutdownVm would refuse (the wire bound).

    Raises:
        ApiError: 400 naming the field, the bound and the fix.
    """
    if not 0 < timeout_s <= MAX_STOP_TIMEOUT_S:  # also refuses NaN
        raise ApiError(
            400,
            "invalid_body",
            f"stop request: timeout_s must be more than 0 and at most {MAX_STOP_TIMEOUT_S:g} seconds, "
            f"got {timeout_s:g}; send a timeout within that range, or force=true to power off at once",
        )


def _lifecycle_routes(api: APIRouter, vms: VmService, ops: OperationResponses) -> None:
    """start, pause, resume and reboot: one route each, with no body."""
    actions: dict[str, tuple[Callable[[str], OperationRecord], str]] = {
        "start": (vms.start, "Start a VM"),
        "pause": (vms.pause, "Pause a VM (freeze its vCPUs)"),
        "resume": (vms.resume, "Resume a paused VM"),
        "reboot": (vms.reboot, "Reset a running VM"),
    }
    for action, (operation, text) in actions.items():
        api.add_api_route(
            f"{PREFIX}/vms/{{name}}/{action}",
            _action_route(action, operation, ops),
            methods=["POST"],
            summary=text,
            status_code=202,
            responses=responses(202, "operation", 404, 409),
        )


def _action_route(
    action: str, operation: Callable[[str], OperationRecord], ops: OperationResponses
) -> Callable[..., Awaitable[Response]]:
    async def run(name: str, wait: float = WAIT) -> Response:
        return await ops.respond(operation(name).op_id, wait)

    run.__name__ = f"{action}_vm"
    return run


def _create_route(
    api: APIRouter, store: Store, vms: VmService, operations: Operations, view: views.Views
) -> None:
    """POST /vms: one VM or a batch, or only the plan with dry_run."""

    @api.post(
        f"{PREFIX}/vms",
        summary="Create a VM (placed by the scheduler, then started)",
        status_code=202,
        responses=responses(202, "created", 400, 409, 413),
        openapi_extra=body("spec"),
    )
    async def create_vm(
        request: Request,
        wait: float = WAIT,
        start: bool = Query(True),
        dry_run: bool = Query(False, description="only say where it would go, and why; claim nothing"),
        explain: bool = Query(False, description="include the scheduler's explanation"),
    ) -> Response:
        asked: rest.CreateVmRequest = await read_body(request, rest.CreateVmRequest, "vm spec")
        spec = asked.to_spec()
        if dry_run:
            if asked.count > 1:
                decisions = vms.plan_batch(spec, asked.count, asked.scheduling)
                return json_response(
                    rest.BatchPlanResponse(
                        vms=[
                            rest.PlanResponse(vm=d.vm, host_id=d.host_id or "", explanation=d.explanation)
                            for d in decisions
                        ]
                    )
                )
            decision = vms.plan(spec, asked.scheduling)
            if decision.host_id is None:
                raise refusal_error(decision)
            return json_response(
                rest.PlanResponse(vm=spec.name, host_id=decision.host_id, explanation=decision.explanation)
            )
        if asked.count > 1:
            created = vms.create_batch(spec, asked.count, start=start, hints=asked.scheduling)
            results = [
                await _created(record, op, wait, decision.explanation if explain else None)
                for record, op, decision in created
            ]
            running = any(r.operation.state == "running" for r in results)
            return json_response(rest.CreateBatchResponse(vms=results), 202 if running else 200)
        record, op, decision = vms.create(spec, start=start, hints=asked.scheduling)
        result = await _created(record, op, wait, decision.explanation if explain else None)
        return json_response(result, 202 if result.operation.state == "running" else 200)

    async def _created(
        record: VmRecord, op: OperationRecord, wait: float, explanation: Explanation | None = None
    ) -> rest.CreateVmResponse:
        if wait:
            op = await operations.wait(op.op_id, wait)
            record = store.vm(record.name) or record
        return rest.CreateVmResponse(
            vm=view.vm(record), operation=views.operation_view(op), explanation=explanation
        )
