"""What a call to the controller can raise: one ``ApiError`` family, phrased for the person reading it.

Every failure of the REST API reaches a script as an :class:`ApiError` whose ``str()`` is the
controller's own message (the CLI prints exactly that), with the HTTP ``status``, the error ``code``
to branch on (``vm_busy``, ``no_valid_host``, ``invalid_selector``...) and its ``detail``. The
subclasses sort them by what a script does next:

- :class:`InvalidRequest` (400): fix the input; :class:`Unauthorized` (401), :class:`Forbidden`
  (403): fix the token; :class:`NotFound` (404); :class:`Conflict` (409): the fleet is not in a state
  that allows it now (busy, refused by placement), so look, then retry or change the request;
- :class:`Unreachable`: no answer at all (the controller is down or the URL is wrong);
- :class:`NoAnswer`: the controller took the request but did not answer in time (it may have done
  it: a retry with the same idempotency key is safe);
- :class:`OperationFailed`: :meth:`~controller.client.operations.Operations.wait` saw the operation
  end in ``failed`` (raised only when asked to).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocols.rest import OperationView


class ApiError(Exception):
    """A refusal or failure of ``method path``; ``str()`` is the message for people."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "",
        detail: dict[str, Any] | None = None,
        method: str = "",
        path: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.detail = detail or {}
        self.method = method
        self.path = path


class InvalidRequest(ApiError):
    """400: the request is wrong (a field, a selector, a header); the message names what and how."""


class Unauthorized(ApiError):
    """401: no token, or one the controller does not know."""


class Forbidden(ApiError):
    """403: the token's role may not do this."""


class NotFound(ApiError):
    """404: no such VM, host, operation or token."""


class Conflict(ApiError):
    """409: not now (the VM is busy, no host can take it, the key was used for another request...)."""


class Unreachable(ApiError):
    """The controller could not be reached; nothing was sent, or nothing came back."""


class NoAnswer(ApiError):
    """The controller accepted the request but did not answer in time; it may have acted on it."""


class OperationFailed(ApiError):
    """An operation that was waited for ended ``failed``; ``operation`` is its last view."""

    def __init__(self, operation: OperationView) -> None:
        what = operation.vm or operation.host_id or operation.op_id
        super().__init__(
            f"{operation.kind} of {what} failed (operation {operation.op_id}): {operation.error}",
            code="operation_failed",
            detail={"op_id": operation.op_id},
        )
        self.operation = operation


BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: InvalidRequest,
}
