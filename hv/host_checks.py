"""Checks every engine makes of its host: a usable host id, and room in memory for one more VM.

Both engines refuse the same things in the same words, so the agent and the person reading the
error see one message whichever engine runs. Imports only :mod:`hv.driver` and :mod:`protocols`.
"""

from __future__ import annotations

from hv.driver import InsufficientResources
from protocols.vmspec import HOST_ID_RE, VmSpec

__all__ = ["require_free_memory", "require_valid_host_id"]


def require_valid_host_id(host_id: str) -> None:
    """Refuse a host id that the bus topics and state directories cannot carry.

    Raises:
        ValueError: ``host_id`` does not match :data:`protocols.vmspec.HOST_ID_RE`.
    """
    if not HOST_ID_RE.fullmatch(host_id):
        raise ValueError(
            f"host id {host_id!r} is invalid: use 1-64 letters, digits, '.', '_' and '-', "
            "starting and ending with a letter or digit"
        )


def require_free_memory(
    spec: VmSpec, *, host_id: str, memory_mib: int, committed_mib: int, defined_vms: int
) -> None:
    """Refuse ``spec`` when the host's memory less what its defined VMs hold is too small for it.

    Raises:
        InsufficientResources: ``spec.memory_mib`` exceeds ``memory_mib - committed_mib``.
    """
    free = memory_mib - committed_mib
    if spec.memory_mib > free:
        raise InsufficientResources(
            f"vm {spec.name!r} needs {spec.memory_mib} MiB of memory but host {host_id!r} has "
            f"{free} MiB free ({committed_mib} of {memory_mib} MiB held by {defined_vms} defined "
            "VMs); undefine VMs that are not needed or place it on another host"
        )
