"""The error every controller refusal becomes: an HTTP status, a stable code, and a message with the fix."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refusal the operator sees: HTTP status, a stable code, and a message with the fix."""

    def __init__(self, status: int, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail or {}
