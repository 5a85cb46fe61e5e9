"""Errors of the qemu engine that :mod:`hv.driver` does not have (yet).

:class:`InvalidSpec` is a spec this engine refuses before anything changes: a path outside the
image directories, a backing file that escapes them, a device the machine type cannot carry. It
carries the ``invalid_request`` reply code, so the agent reports it as bad input rather than as an
engine failure.
"""

from __future__ import annotations

from hv.driver import HvError

__all__ = ["InvalidSpec"]


class InvalidSpec(HvError):
    """The VM spec asks for something this engine refuses; nothing was changed."""

    code = "invalid_request"
