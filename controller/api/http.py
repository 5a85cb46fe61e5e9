"""What every router shares: JSON responses, body decoding, the OpenAPI schema registry, and the one
place where domain errors become HTTP statuses.

Every error is JSON ``{"error": {"code", "message", "detail"}}`` where the message names the thing,
the reason and the fix.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import Query, Request
from fastapi.responses import Response

from controller.common.errors import Conflict, DomainError, HardwareFailed, Invalid, NotFound
from controller.state.store import EventRecord
from protocols import rest
from protocols.rest import MigrationPlan
from protocols.vmspec import explain_validation_error

PREFIX = "/api/v1"
#: Sequence numbers are SQLite integers; anything larger is a client error, not an overflow.
MAX_SEQ = 2**63 - 1

#: The HTTP status of each kind of domain error. The only place a status is chosen for one.
STATUS_OF: dict[type[DomainError], int] = {Invalid: 400, NotFound: 404, Conflict: 409, HardwareFailed: 502}


class ApiError(Exception):
    """A refusal made by the HTTP edge itself (auth, a bad body): status, stable code, message."""

    def __init__(self, status: int, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail or {}


def status_of(exc: DomainError) -> int:
    """The HTTP status a domain error maps to."""
    for kind in type(exc).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]
    return 400


#: Every type the API document describes, by the short name routes refer to.
SCHEMA_TYPES: dict[str, Any] = {
    "host": rest.HostView,
    "vm": rest.VmView,
    "operation": rest.OperationView,
    "operations": rest.OperationPage,
    "created": rest.CreateVmResponse,
    "error": rest.ErrorBody,
    "stop": rest.StopRequest,
    "host_update": rest.HostUpdate,
    "confirmed_down": rest.ConfirmDownResponse,
    "forgotten": rest.ForgetResponse,
    "migrate": rest.MigrateRequest,
    "evacuate": rest.EvacuateRequest,
    "migration_plan": MigrationPlan,
    "spec": rest.CreateVmRequest,
    "plan": rest.PlanResponse,
    "batch_plan": rest.BatchPlanResponse,
    "batch": rest.CreateBatchResponse,
    "hosts": list[rest.HostView],
    "vms": list[rest.VmView],
    "events": list[EventRecord],
    "token_request": rest.TokenRequest,
    "new_token": rest.NewToken,
    "tokens": list[rest.TokenInfo],
    "audit": list[rest.AuditRecord],
    "power_plan": rest.Plan,
    "plan_outcome": rest.PlanOutcome,
    "power_status": rest.PowerStatus,
    "power_mode": rest.ModeRequest,
    "host_power_request": rest.HostPowerRequest,
    "host_power": rest.HostPowerReport,
    "bulk_request": rest.BulkRequest,
    "bulk_plan": rest.BulkPlan,
    "rolling_request": rest.RollingRequest,
    "rolling_plan": rest.RollingPlan,
    "continue_request": rest.ContinueRequest,
    "pending_hosts": list[rest.PendingHost],
    "vm_update": rest.VmUpdate,
    "accepted": rest.AcceptedHost,
    "join_token_request": rest.JoinTokenRequest,
    "join_token": rest.JoinToken,
}
_schemas, COMPONENTS = msgspec.json.schema_components(
    tuple(SCHEMA_TYPES.values()), ref_template="#/components/schemas/{name}"
)
_SCHEMA: dict[str, dict[str, Any]] = dict(zip(SCHEMA_TYPES, _schemas, strict=True))

_encoder = msgspec.json.Encoder()

#: The ``wait`` query parameter of every route that starts an operation.
WAIT = Query(0.0, ge=0.0, le=600.0, description="seconds to wait for the operation to end")


def json_response(content: Any, status: int = 200) -> Response:
    """``content`` encoded by msgspec as a JSON response."""
    return Response(_encoder.encode(content), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str, detail: dict[str, Any] | None = None) -> Response:
    """The JSON error body every refusal has."""
    body = rest.ErrorBody(error=rest.ErrorDetail(code=code, message=message, detail=detail or {}))
    return json_response(body, status)


def responses(ok_status: int, schema: str, *errors: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route: its success schema and its error statuses."""
    out: dict[int | str, dict[str, Any]] = {
        ok_status: {"description": "OK", "content": {"application/json": {"schema": _SCHEMA[schema]}}}
    }
    for status in errors:
        out[status] = {"description": "error", "content": {"application/json": {"schema": _SCHEMA["error"]}}}
    return out


def body(schema: str, required: bool = True) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route."""
    return {
        "requestBody": {"required": required, "content": {"application/json": {"schema": _SCHEMA[schema]}}}
    }


async def read_body(request: Request, type_: type[Any], what: str, required: bool = True) -> Any:
    """Decode a JSON body into ``type_``.

    Raises:
        ApiError: 400 empty, not JSON, or a field is wrong (with its path).
    """
    raw = await request.body()  # already read, within the size limit, by controller.api.edge
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
