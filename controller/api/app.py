"""The REST API under ``/api/v1``, with its OpenAPI document at ``/api/v1/openapi.json``.

Bodies are decoded with msgspec straight into the same :class:`protocols.vmspec.VmSpecInput` the CLI
uses, so every entry point refuses bad input with the same message; responses are msgspec Structs
from :mod:`controller.api.views`. FastAPI only routes and assembles the OpenAPI document, into which
the msgspec schemas are merged. Each resource has its router module; this one assembles them, maps
errors to responses, and authenticates every request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.api import (
    actions,
    events,
    health,
    hosts,
    idempotency,
    migrations,
    operations,
    power,
    rolling,
    tokens,
    views,
    vms,
)
from controller.api.http import COMPONENTS, PREFIX, ApiError, error_response, status_of
from controller.common.errors import DomainError
from controller.security import auth
from controller.services.bulk import BulkActions
from controller.services.hosts import HostService
from controller.services.migration.evacuation import Evacuations
from controller.services.migration.migrate import MigrationService
from controller.services.operations import Operations
from controller.services.power import PowerService
from controller.services.rolling import RollingMaintenance
from controller.services.vms import VmService
from controller.state.events import EventHub
from controller.state.idempotency import IdempotencyStore
from controller.state.store import Store


@dataclass(frozen=True, slots=True)
class ApiParts:
    """What the routers use; the daemon builds it, and each router gets only its own part."""

    store: Store
    events: EventHub
    views: views.Views
    vms: VmService
    hosts: HostService
    operations: Operations
    migrations: MigrationService
    evacuations: Evacuations
    bulk: BulkActions
    rolling: RollingMaintenance
    power: PowerService
    authority: auth.Authority
    health: Callable[[], dict[str, Any]]
    #: HA's manual fence acknowledgement (``host confirm-down``): returns how many restarts began.
    confirm_down: Callable[[str], int]


def create_app(parts: ApiParts) -> FastAPI:
    """The FastAPI application of the controller's REST API."""
    app = FastAPI(
        title="Fleetvisor",
        version="1",
        description="Fleet manager for virtual machines.",
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
    )
    _error_handlers(app)
    retries = idempotency.Idempotency(IdempotencyStore(parts.store.connection))
    # Registered before authentication, so it runs after it (the last registered runs first).
    app.middleware("http")(retries.handle)
    _authentication(app, parts.authority)
    ops = operations.OperationResponses(parts.operations, parts.migrations)
    for api in (
        tokens.router(parts.authority),
        health.router(parts.health),
        hosts.router(parts.store, parts.hosts, parts.evacuations, parts.views, ops, parts.confirm_down),
        vms.router(parts.store, parts.vms, parts.operations, parts.views, ops),
        migrations.router(parts.migrations, ops),
        power.router(parts.power),
        operations.router(ops, parts.evacuations, parts.bulk, parts.rolling),
        actions.router(parts.bulk, ops),
        rolling.router(parts.rolling, ops),
        events.router(parts.store, parts.events),
    ):
        app.include_router(api)

    def _openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(COMPONENTS)
            for item in schema.get("paths", {}).values():
                for method in ("post", "put", "patch", "delete"):
                    if method in item:
                        item[method].setdefault("parameters", []).append(idempotency.PARAMETER)
            app.openapi_schema = _ecma_patterns(schema)
        return app.openapi_schema

    app.openapi = _openapi  # type: ignore[method-assign]
    return app


def _ecma_patterns(node: Any) -> Any:
    r"""The schema with each name pattern in the regex dialect JSON Schema means (ECMA-262).

    The server matches names with Python's ``\Z`` (end of text; ``$`` would also take a trailing
    newline). ECMA-262 has no ``\Z``, and there ``$`` without the multiline flag is already the end
    of the text, so a client validating with the published pattern gets the same answer.
    """
    if isinstance(node, dict):
        return {
            key: value[:-2] + "$" if key == "pattern" and isinstance(value, str) and value.endswith("\\Z")
            else _ecma_patterns(value)
            for key, value in node.items()
        }  # fmt: skip
    if isinstance(node, list):
        return [_ecma_patterns(value) for value in node]
    return node


def _error_handlers(app: FastAPI) -> None:
    """Domain errors, the edge's own refusals and FastAPI's errors, all as the one JSON error body."""

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> Response:
        return error_response(status_of(exc), exc.code, exc.message, exc.detail)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return error_response(400, "invalid_request", f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(
                404, "not_found", f"no such endpoint {request.url.path}; see {PREFIX}/openapi.json"
            )
        if exc.status_code == 405:
            return error_response(
                405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
            )
        return error_response(exc.status_code, "http_error", str(exc.detail))


def _authentication(app: FastAPI, authority: auth.Authority) -> None:
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
            return error_response(exc.status, exc.code, exc.message)
        request.state.caller = caller or auth.ANONYMOUS
        response = await call_next(request)
        if mutating:
            authority.audit(caller, method, path, response.status_code, str(request.url.query))
        return response
