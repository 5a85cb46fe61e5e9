"""The REST API under ``/api/v1``, with its OpenAPI document at ``/api/v1/openapi.json``.

Bodies are decoded with msgspec straight into the same :class:`protocols.vmspec.VmSpecInput` the CLI
uses, so every entry point refuses bad input with the same message; responses are msgspec Structs
from :mod:`controller.views`. FastAPI only routes and assembles the OpenAPI document, into which
the msgspec schemas are merged.

Every error is JSON ``{"error": {"code", "message", "detail"}}`` where the message names the thing,
the reason and the fix.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller import auth, power_manager, views
from controller.errors import ApiError
from controller.fleet import FleetService
from controller.migration import MigrationPlan
from controller.store import EventRecord, Usage
from protocols.vmspec import explain_validation_error

PREFIX = "/api/v1"
#: Sequence numbers are SQLite integers; anything larger is a client error, not an overflow.
_MAX_SEQ = 2**63 - 1
MAX_BODY_BYTES = 256 * 1024

#: Every type the API document describes, by the short name routes refer to.
_SCHEMA_TYPES: dict[str, Any] = {
    "host": views.HostView,
    "vm": views.VmView,
    "operation": views.OperationView,
    "created": views.CreateVmResponse,
    "error": views.ErrorBody,
    "stop": views.StopRequest,
    "host_update": views.HostUpdate,
    "migrate": views.MigrateRequest,
    "evacuate": views.EvacuateRequest,
    "migration_plan": MigrationPlan,
    "spec": views.CreateVmRequest,
    "plan": views.PlanResponse,
    "batch": views.CreateBatchResponse,
    "hosts": list[views.HostView],
    "vms": list[views.VmView],
    "events": list[EventRecord],
    "token_request": auth.TokenRequest,
    "new_token": auth.NewToken,
    "tokens": list[auth.TokenInfo],
    "audit": list[auth.AuditRecord],
    "power_plan": power_manager.Plan,
    "plan_outcome": power_manager.PlanOutcome,
    "power_status": power_manager.PowerStatus,
    "power_mode": power_manager.ModeRequest,
    "host_power_request": power_manager.HostPowerRequest,
    "host_power": power_manager.HostPowerReport,
}
_schemas, _components = msgspec.json.schema_components(
    tuple(_SCHEMA_TYPES.values()), ref_template="#/components/schemas/{name}"
)
_SCHEMA: dict[str, dict[str, Any]] = dict(zip(_SCHEMA_TYPES, _schemas, strict=True))

_encoder = msgspec.json.Encoder()


def _json(content: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(content), status_code=status, media_type="application/json")


def _error(status: int, code: str, message: str, detail: dict[str, Any] | None = None) -> Response:
    body = views.ErrorBody(error=views.ErrorDetail(code=code, message=message, detail=detail or {}))
    return _json(body, status)


def _responses(ok_status: int, schema: str, *errors: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        ok_status: {"description": "OK", "content": {"application/json": {"schema": _SCHEMA[schema]}}}
    }
    for status in errors:
        out[status] = {"description": "error", "content": {"application/json": {"schema": _SCHEMA["error"]}}}
    return out


def _body(schema: str, required: bool = True) -> dict[str, Any]:
    return {
        "requestBody": {"required": required, "content": {"application/json": {"schema": _SCHEMA[schema]}}}
    }


async def _read_body(request: Request, type_: type[Any], what: str, required: bool = True) -> Any:
    """Decode a JSON body into ``type_``; an ApiError with the msgspec path on anything wrong."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(
            413,
            "body_too_large",
            f"{what}: the body is {len(raw)} bytes, over the {MAX_BODY_BYTES} byte limit",
        )
    if not raw.strip():
        if not required:
            return msgspec.json.decode(b"{}", type=type_)
        raise ApiError(400, "invalid_body", f"{what}: the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        raise ApiError(
            400, "invalid_body", f"{what}: {explain_validation_error(exc)}; fix that field and retry"
        ) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"{what}: the body is not valid JSON ({exc})") from None


def create_app(service: FleetService, authority: auth.Authority | None = None) -> FastAPI:
    authority = authority or auth.Authority(service.store.connection, enabled=False)
    app = FastAPI(
        title="Fleetvisor",
        version="1",
        description="Fleet manager for virtual machines.",
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.code, exc.message, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return _error(400, "invalid_request", f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return _error(404, "not_found", f"no such endpoint {request.url.path}; see {PREFIX}/openapi.json")
        if exc.status_code == 405:
            return _error(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.middleware("http")
    async def _authenticate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Every request is authenticated and authorised; every mutating one is audited."""
        method, path = request.method, request.url.path
        mutating = method not in ("GET", "HEAD", "OPTIONS")
        caller: auth.Caller | None = None
        try:
            needed = auth.required_role(method, path)
            if needed is not None:
                caller = authority.authenticate(request.headers.get("authorization"))
                authority.authorize(caller, needed, f"{method} {path}")
        except auth.AuthError as exc:
            if mutating:
                authority.audit(caller, method, path, exc.status, exc.code)
            return _error(exc.status, exc.code, exc.message)
        request.state.caller = caller or auth.ANONYMOUS
        response = await call_next(request)
        if mutating:
            authority.audit(caller, method, path, response.status_code, str(request.url.query))
        return response

    @app.post(
        f"{PREFIX}/tokens",
        summary="Create an API token (admin); the token is shown once",
        status_code=201,
        responses=_responses(201, "new_token", 400, 401, 403, 409),
        openapi_extra=_body("token_request"),
    )
    async def create_token(request: Request) -> Response:
        body: auth.TokenRequest = await _read_body(request, auth.TokenRequest, "token request")
        try:
            return _json(authority.create_token(body.name, body.role), 201)
        except auth.AuthError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None

    @app.get(
        f"{PREFIX}/tokens", summary="List API tokens (admin)", responses=_responses(200, "tokens", 401, 403)
    )
    async def list_tokens() -> Response:
        return _json(authority.tokens())

    @app.delete(f"{PREFIX}/tokens/{{name}}", summary="Revoke an API token (admin)", status_code=204)
    async def revoke_token(name: str) -> Response:
        try:
            authority.revoke(name)
        except auth.AuthError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        return Response(status_code=204)

    @app.get(
        f"{PREFIX}/audit",
        summary="The audit log of mutating requests (admin)",
        responses=_responses(200, "audit"),
    )
    async def list_audit(
        since: int = Query(0, ge=0, le=_MAX_SEQ), limit: int = Query(100, ge=1, le=1000)
    ) -> Response:
        return _json(authority.audit_since(since, limit))

    wait_param = Query(0.0, ge=0.0, le=600.0, description="seconds to wait for the operation to end")

    @app.get(f"{PREFIX}/health", summary="Controller health")
    async def health() -> Response:
        return _json(
            {
                "status": "ok",
                "bus_connected": service.bus.connected.is_set(),
                "hosts_online": service.online_host_count(),
                "vms_running": service.running_vm_count(),
                "telemetry_messages": service.telemetry_count,
                "bad_messages": service.decoder.stats.rejected,
                "rate_limited_messages": sum(service.limiter.dropped.values()),
            }
        )

    @app.get(f"{PREFIX}/hosts", summary="List hosts", responses=_responses(200, "hosts"))
    async def list_hosts() -> Response:
        usage = service.store.usage()
        return _json(
            [views.host_view(service, h, usage.get(h.host_id, _ZERO)) for h in service.store.hosts()]
        )

    @app.get(f"{PREFIX}/hosts/{{host_id}}", summary="Show a host", responses=_responses(200, "host", 404))
    async def show_host(host_id: str) -> Response:
        host = service.require_host(host_id)
        return _json(views.host_view(service, host, service.store.usage().get(host_id, _ZERO)))

    @app.patch(
        f"{PREFIX}/hosts/{{host_id}}",
        summary="Set a host's labels and maintenance mode",
        responses=_responses(200, "host", 400, 404),
        openapi_extra=_body("host_update"),
    )
    async def update_host(request: Request, host_id: str) -> Response:
        body: views.HostUpdate = await _read_body(request, views.HostUpdate, "host update")
        host = service.update_host(host_id, labels=body.labels, maintenance=body.maintenance)
        return _json(views.host_view(service, host, service.store.usage().get(host_id, _ZERO)))

    @app.get(f"{PREFIX}/vms", summary="List VMs", responses=_responses(200, "vms"))
    async def list_vms(host: str | None = Query(None, description="only VMs on this host")) -> Response:
        online = {h.host_id: h.online for h in service.store.hosts()}
        return _json([views.vm_view(service, vm, online) for vm in service.store.vms(host)])

    @app.post(
        f"{PREFIX}/vms",
        summary="Create a VM (placed by the scheduler, then started)",
        status_code=202,
        responses=_responses(202, "created", 400, 409, 413),
        openapi_extra=_body("spec"),
    )
    async def create_vm(
        request: Request,
        wait: float = wait_param,
        start: bool = Query(True),
        dry_run: bool = Query(False, description="only say where it would go, and why; claim nothing"),
        explain: bool = Query(False, description="include the scheduler's explanation"),
    ) -> Response:
        body: views.CreateVmRequest = await _read_body(request, views.CreateVmRequest, "vm spec")
        spec = body.to_spec()
        if dry_run:
            if body.count > 1:
                raise ApiError(400, "invalid_request", "dry_run plans one VM; drop count or dry_run")
            decision = service.plan_vm(spec, body.scheduling)
            if decision.host_id is None:
                raise service.refusal_error(decision)
            return _json(
                views.PlanResponse(vm=spec.name, host_id=decision.host_id, explanation=decision.explanation)
            )
        if body.count > 1:
            created = service.create_batch(spec, body.count, start=start, hints=body.scheduling)
            results = []
            for record, op in created:
                if wait:
                    op = await service.wait_operation(op.op_id, wait)
                    record = service.store.vm(record.name) or record
                results.append(
                    views.CreateVmResponse(
                        vm=views.vm_view(service, record), operation=views.operation_view(op)
                    )
                )
            running = any(r.operation.state == "running" for r in results)
            return _json(views.CreateBatchResponse(vms=results), 202 if running else 200)
        record, op, decision = service.create_vm(spec, start=start, hints=body.scheduling)
        if wait:
            op = await service.wait_operation(op.op_id, wait)
            record = service.store.vm(record.name) or record
        status = 202 if op.state == "running" else 200
        response = views.CreateVmResponse(
            vm=views.vm_view(service, record),
            operation=views.operation_view(op),
            explanation=decision.explanation if explain else None,
        )
        return _json(response, status)

    @app.get(f"{PREFIX}/vms/{{name}}", summary="Show a VM", responses=_responses(200, "vm", 404))
    async def show_vm(name: str) -> Response:
        return _json(views.vm_view(service, service.require_vm(name)))

    async def _op_response(op_id: str, wait: float) -> Response:
        op = await service.wait_operation(op_id, wait) if wait else service.require_operation(op_id)
        view = views.operation_view(op, service.migrations.progress.get(op.op_id))
        return _json(view, 202 if op.state == "running" else 200)

    def _vm_action(action: str) -> Callable[..., Awaitable[Response]]:
        operations = {"pause": service.pause_vm, "resume": service.resume_vm, "reboot": service.reboot_vm}

        async def run(name: str, wait: float = wait_param) -> Response:
            return await _op_response(operations[action](name).op_id, wait)

        run.__name__ = f"{action}_vm"
        return run

    @app.post(
        f"{PREFIX}/vms/{{name}}/start",
        summary="Start a VM",
        status_code=202,
        responses=_responses(202, "operation", 404, 409),
    )
    async def start_vm(name: str, wait: float = wait_param) -> Response:
        return await _op_response(service.start_vm(name).op_id, wait)

    for action, text in (("pause", "Pause a VM (freeze its vCPUs)"), ("resume", "Resume a paused VM"),
                         ("reboot", "Reset a running VM")):  # fmt: skip
        app.add_api_route(
            f"{PREFIX}/vms/{{name}}/{action}",
            _vm_action(action),
            methods=["POST"],
            summary=text,
            status_code=202,
            responses=_responses(202, "operation", 404, 409),
        )

    @app.post(
        f"{PREFIX}/vms/{{name}}/stop",
        summary="Stop a VM (graceful, or forced with force=true)",
        status_code=202,
        responses=_responses(202, "operation", 400, 404, 409),
        openapi_extra=_body("stop", required=False),
    )
    async def stop_vm(request: Request, name: str, wait: float = wait_param) -> Response:
        body: views.StopRequest = await _read_body(request, views.StopRequest, "stop request", required=False)
        return await _op_response(
            service.stop_vm(name, force=body.force, timeout_s=body.timeout_s).op_id, wait
        )

    @app.delete(
        f"{PREFIX}/vms/{{name}}",
        summary="Delete a VM",
        status_code=202,
        responses=_responses(202, "operation", 404, 409),
    )
    async def delete_vm(name: str, wait: float = wait_param) -> Response:
        return await _op_response(service.delete_vm(name).op_id, wait)

    @app.post(
        f"{PREFIX}/vms/{{name}}/migrate",
        summary="Live-migrate a running VM (or, with dry_run, predict the migration)",
        status_code=202,
        responses=_responses(202, "operation", 400, 404, 409),
        openapi_extra=_body("migrate", required=False),
    )
    async def migrate_vm(
        request: Request,
        name: str,
        wait: float = wait_param,
        dry_run: bool = Query(False, description="only choose the target and predict; change nothing"),
    ) -> Response:
        body: views.MigrateRequest = await _read_body(
            request, views.MigrateRequest, "migrate request", required=False
        )
        if dry_run:
            return _json(service.migrations.plan(name, body.to, body.policy))
        return await _op_response(service.migrations.start(name, body.to, body.policy).op_id, wait)

    @app.post(
        f"{PREFIX}/vms/{{name}}/migrate/cancel",
        summary="Cancel a VM's migration before the switch-over (it stays on its source)",
        status_code=202,
        responses=_responses(202, "operation", 404, 409),
    )
    async def cancel_migration(name: str, wait: float = wait_param) -> Response:
        return await _op_response((await service.migrations.cancel(name)).op_id, wait)

    @app.post(
        f"{PREFIX}/hosts/{{host_id}}/evacuate",
        summary="Live-migrate every running VM off a host, in waves",
        status_code=202,
        responses=_responses(202, "operation", 400, 404, 409),
        openapi_extra=_body("evacuate", required=False),
    )
    async def evacuate_host(request: Request, host_id: str, wait: float = wait_param) -> Response:
        body: views.EvacuateRequest = await _read_body(
            request, views.EvacuateRequest, "evacuate request", required=False
        )
        return await _op_response(service.migrations.start_evacuation(host_id, body.policy).op_id, wait)

    @app.get(
        f"{PREFIX}/plan",
        summary="The power manager's current recommendation: moves and power actions, each with its reason",
        responses=_responses(200, "power_plan"),
    )
    async def show_plan() -> Response:
        return _json(service.power.current_plan())

    @app.post(
        f"{PREFIX}/plan/apply",
        summary="Execute the current recommendation once (automation levels manual and recommend)",
        responses=_responses(200, "plan_outcome", 409),
    )
    async def apply_plan() -> Response:
        return _json(await service.power.apply())

    @app.get(
        f"{PREFIX}/power",
        summary="The power manager: automation level, settings, each host's power and energy",
        responses=_responses(200, "power_status"),
    )
    async def show_power() -> Response:
        return _json(service.power.status())

    @app.put(
        f"{PREFIX}/power/mode",
        summary="Switch the power manager's automation level (manual, recommend, auto)",
        responses=_responses(200, "power_status", 400),
        openapi_extra=_body("power_mode"),
    )
    async def set_power_mode(request: Request) -> Response:
        body: power_manager.ModeRequest = await _read_body(request, power_manager.ModeRequest, "power mode")
        service.power.set_mode(body.mode)
        return _json(service.power.status())

    @app.get(
        f"{PREFIX}/hosts/{{host_id}}/power",
        summary="A host's power as its methods read it, and whether its wake path verifies",
        responses=_responses(200, "host_power", 404, 409),
    )
    async def host_power_status(host_id: str) -> Response:
        return _json(await service.power.host_status(host_id))

    @app.post(
        f"{PREFIX}/hosts/{{host_id}}/power",
        summary="Power a host on, or put an empty host in standby (off), through its power methods",
        responses=_responses(200, "host_power", 400, 404, 409, 502),
        openapi_extra=_body("host_power_request"),
    )
    async def host_power_action(request: Request, host_id: str) -> Response:
        body: power_manager.HostPowerRequest = await _read_body(
            request, power_manager.HostPowerRequest, "host power request"
        )
        return _json(await service.power.host_action(host_id, body.action))

    @app.get(
        f"{PREFIX}/operations/{{op_id}}",
        summary="Show an operation",
        responses=_responses(200, "operation", 404),
    )
    async def show_operation(op_id: str, wait: float = wait_param) -> Response:
        return await _op_response(op_id, wait)

    @app.get(f"{PREFIX}/events", summary="Past events, oldest first", responses=_responses(200, "events"))
    async def list_events(
        since: int = Query(0, ge=0, le=_MAX_SEQ, description="only events after this sequence number"),
        limit: int = Query(100, ge=1, le=1000),
    ) -> Response:
        return _json(service.store.events_since(since, limit))

    @app.get(
        f"{PREFIX}/events/stream",
        summary="Live event stream (Server-Sent Events); resumes after Last-Event-ID",
        response_class=StreamingResponse,
    )
    async def stream_events(
        request: Request, since: int | None = Query(None, ge=0, le=_MAX_SEQ)
    ) -> StreamingResponse:
        header = request.headers.get("last-event-id")
        start = since
        if start is None and header is not None:
            if not header.isdigit() or int(header) > _MAX_SEQ:
                raise ApiError(
                    400, "invalid_request", f"Last-Event-ID {header!r} is not an event sequence number"
                )
            start = int(header)
        return StreamingResponse(
            _sse(service, request.is_disconnected, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(_components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = _openapi  # type: ignore[method-assign]
    return app


_ZERO = Usage()


async def _sse(
    service: FleetService, disconnected: Callable[[], Any], since: int | None
) -> AsyncIterator[bytes]:
    sub = service.events.subscribe()
    try:
        if since is not None:
            for event in service.store.events_since(since, limit=10_000):
                yield _sse_frame(event)
        yield b": connected\n\n"
        while True:
            try:
                event = await asyncio.wait_for(sub.queue.get(), 15.0)
            except TimeoutError:
                if await disconnected():
                    return
                yield b": keep-alive\n\n"
                continue
            if since is not None and event.seq <= since:
                continue
            yield _sse_frame(event)
    finally:
        sub.close()


def _sse_frame(event: EventRecord) -> bytes:
    data = json.dumps(msgspec.to_builtins(event), separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.type}\ndata: {data}\n\n".encode()
