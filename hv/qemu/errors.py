"""Errors of the qemu engine that :mod:`hv.driver` does not have.

:class:`InvalidSpec` is a spec this engine refuses before anything changes: a path outside the
image directories, a backing file that escapes them, a device the machine type cannot carry. It is
an :class:`hv.driver.InvalidRequest` (reply code ``invalid_request``), so the agent reports it as
bad input rather than as an engine failure, and callers may catch either.

Imports: :mod:`hv.driver` only.
"""

from __future__ import annotations

from hv.driver import InvalidRequest

__all__ = ["InvalidSpec"]


class InvalidSpec(InvalidRequest):
    """The VM spec asks for something this engine refuses; nothing was changed."""

    code = "invalid_request"
