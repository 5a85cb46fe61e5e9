"""Routes of ``/hosts``: list, show, labels and maintenance, evacuation, confirm-down and forget;
enrolment (pending hosts, accept) and one-time join tokens (``/tokens/join``, admin like every
``/tokens`` route).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from controller.api import views
from controller.api.http import PREFIX, WAIT, body, json_response, read_body, responses
from controller.api.operations import OperationResponses
from controller.api.views import SELECTOR_HELP
from controller.common import selectors
from controller.services.hosts import HostService
from controller.services.migration.evacuation import Evacuations
from controller.services.selection import select_hosts
from controller.state.store import Store, Usage
from protocols import rest

_ZERO = Usage()


def router(
    store: Store,
    hosts: HostService,
    evacuations: Evacuations,
    view: views.Views,
    ops: OperationResponses,
    confirm: Callable[[str], int],
) -> APIRouter:
    """The host routes."""
    api = APIRouter()

    @api.get(f"{PREFIX}/hosts", summary="List hosts", responses=responses(200, "hosts"))
    async def list_hosts(selector: str = Query("", description=SELECTOR_HELP)) -> Response:
        chosen = selectors.parse(selector, "host")  # a bad one is a 400 pointing at the character
        usage = store.usage()
        return json_response(
            [view.host(h, usage.get(h.host_id, _ZERO)) for h in select_hosts(chosen, store.hosts())]
        )

    _enrolment_routes(api, hosts)

    @api.get(f"{PREFIX}/hosts/{{host_id}}", summary="Show a host", responses=responses(200, "host", 404))
    async def show_host(host_id: str) -> Response:
        host = hosts.require(host_id)
        return json_response(view.host(host, store.usage().get(host_id, _ZERO)))

    @api.patch(
        f"{PREFIX}/hosts/{{host_id}}",
        summary="Set a host's labels and maintenance mode",
        responses=responses(200, "host", 400, 404),
        openapi_extra=body("host_update"),
    )
    async def update_host(request: Request, host_id: str) -> Response:
        update: rest.HostUpdate = await read_body(request, rest.HostUpdate, "host update")
        host = hosts.update(host_id, labels=update.labels, maintenance=update.maintenance, force=update.force)
        return json_response(view.host(host, store.usage().get(host_id, _ZERO)))

    @api.post(
        f"{PREFIX}/hosts/{{host_id}}/confirm-down",
        summary="Confirm a host is off (admin): it is fenced, and HA restarts its HA VMs elsewhere",
        responses=responses(200, "confirmed_down", 404, 409),
    )
    async def confirm_down(host_id: str) -> Response:
        restarts = confirm(host_id)
        host = hosts.require(host_id)
        return json_response(
            rest.ConfirmDownResponse(
                host=view.host(host, store.usage().get(host_id, _ZERO)), restarts=restarts
            )
        )

    @api.delete(
        f"{PREFIX}/hosts/{{host_id}}",
        summary="Forget a host that is gone for good (admin), with the records of the VMs it held",
        responses=responses(200, "forgotten", 404, 409),
    )
    async def forget_host(host_id: str) -> Response:
        return json_response(rest.ForgetResponse(host_id=host_id, vms_removed=hosts.forget(host_id)))

    @api.post(
        f"{PREFIX}/hosts/{{host_id}}/evacuate",
        summary="Live-migrate every running VM off a host, in waves",
        status_code=202,
        responses=responses(202, "operation", 400, 404, 409),
        openapi_extra=body("evacuate", required=False),
    )
    async def evacuate_host(request: Request, host_id: str, wait: float = WAIT) -> Response:
        asked: rest.EvacuateRequest = await read_body(
            request, rest.EvacuateRequest, "evacuate request", required=False
        )
        return await ops.respond(evacuations.start(host_id, asked.policy).op_id, wait)

    return api


def _enrolment_routes(api: APIRouter, hosts: HostService) -> None:
    """Pending hosts, accepting one, and one-time join tokens."""

    @api.get(
        f"{PREFIX}/hosts/pending",
        summary="List hosts waiting to be accepted",
        responses=responses(200, "pending_hosts"),
    )
    async def list_pending() -> Response:
        return json_response(
            [
                rest.PendingHost(
                    host_id=r.host_id, boot_id=r.boot_id, address=r.address, cores=r.cores,
                    memory_mib=r.memory_mib, reason=r.reason, first_seen=r.first_seen, updated_at=r.updated_at,
                )
                for r in hosts.enrolment.pending()
            ]
        )  # fmt: skip

    @api.post(
        f"{PREFIX}/hosts/{{host_id}}/accept",
        summary="Accept a pending host into the fleet (admin)",
        responses=responses(200, "accepted", 404),
    )
    async def accept_host(host_id: str) -> Response:
        await hosts.accept(host_id)
        return json_response(rest.AcceptedHost(host_id=host_id))

    @api.post(
        f"{PREFIX}/tokens/join",
        summary="Create a one-time join token for a new host (admin)",
        responses=responses(200, "join_token", 400),
        openapi_extra=body("join_token_request", required=False),
    )
    async def create_join_token(request: Request) -> Response:
        asked: rest.JoinTokenRequest = await read_body(
            request, rest.JoinTokenRequest, "join token request", required=False
        )
        made = hosts.enrolment.create_token(asked.host_id, asked.ttl_s)
        return json_response(
            rest.JoinToken(token=made.token, host_id=made.host_id, expires_at=made.expires_at)
        )
