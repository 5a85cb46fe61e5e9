"""Domain errors: what a service raises when it refuses a request.

Each carries a stable ``code`` and a message that names the thing, the reason and the fix, plus an
optional ``detail`` mapping (an explanation, limits). The kind of error says what went wrong, not how
an edge shows it: ``controller.api`` maps each kind to an HTTP status, and nothing else does.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A refusal the operator sees: a stable code, and a message with the fix."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}


class NotFound(DomainError):
    """The named VM, host or operation does not exist."""


class Invalid(DomainError):
    """The request itself is wrong (a bad policy, a bad value); retrying it unchanged cannot work."""


class Conflict(DomainError):
    """The request is valid but the fleet's state refuses it now (busy, full, wrong state)."""


class HardwareFailed(DomainError):
    """A host's BMC or power method was asked and failed."""
