"""Routes of ``/tokens`` and ``/audit`` (admin): API tokens and the audit log."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from controller.api.http import MAX_SEQ, PREFIX, ApiError, body, json_response, read_body, responses
from controller.security import auth
from protocols import rest


def router(authority: auth.Authority) -> APIRouter:
    """The token and audit routes."""
    api = APIRouter()

    @api.post(
        f"{PREFIX}/tokens",
        summary="Create an API token (admin); the token is shown once",
        status_code=201,
        responses=responses(201, "new_token", 400, 401, 403, 409),
        openapi_extra=body("token_request"),
    )
    async def create_token(request: Request) -> Response:
        asked: rest.TokenRequest = await read_body(request, rest.TokenRequest, "token request")
        try:
            return json_response(authority.create_token(asked.name, asked.role), 201)
        except auth.AuthError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None

    @api.get(
        f"{PREFIX}/tokens", summary="List API tokens (admin)", responses=responses(200, "tokens", 401, 403)
    )
    async def list_tokens() -> Response:
        return json_response(authority.tokens())

    @api.delete(f"{PREFIX}/tokens/{{name}}", summary="Revoke an API token (admin)", status_code=204)
    async def revoke_token(name: str) -> Response:
        try:
            authority.revoke(name)
        except auth.AuthError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        return Response(status_code=204)

    @api.get(
        f"{PREFIX}/audit",
        summary="The audit log of mutating requests (admin)",
        responses=responses(200, "audit"),
    )
    async def list_audit(
        since: int = Query(0, ge=0, le=MAX_SEQ), limit: int = Query(100, ge=1, le=1000)
    ) -> Response:
        return json_response(authority.audit_since(since, limit))

    return api
