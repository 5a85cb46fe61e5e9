"""Live migration for the qemu engine: the URI both sides agree on, and QMP's answers as our types.

Pure apart from :func:`free_port`: no QMP here. :mod:`hv.qemu.migration_source`,
:mod:`hv.qemu.migration_destination` and :mod:`hv.qemu.storage_copy` run the steps. Imports:
:mod:`hv.driver` (errors) and :mod:`protocols` only.

**The URI** the destination hands out (and the source parses) is QEMU's own migration URI, with the
NBD server of the storage copy appended when the destination exports disks::

    tcp:HOST:PORT                     memory and device state only (no disks, or shared storage)
    tcp:HOST:PORT;nbd=HOST:PORT       plus the destination's NBD server, one export per disk target

An IPv6 host is written in brackets (``tcp:[::1]:4444;nbd=[::1]:4445``). Exports are named after
the disk's target (``vda``).

**Storage copy** (``policy.copy_storage``): each local overlay is mirrored (``blockdev-mirror
sync=top``) into the destination's fresh overlay on the same base image, over NBD. Memory is sent
once every mirror is ready. The source runs with QEMU's ``pause-before-switchover``: when the guest
is stopped for the final copy, QEMU waits while the driver completes the mirrors (a soft
``block-job-cancel`` of a ready mirror copies what is left and keeps the source as it is), and
only then sends the device state. The destination therefore never holds a disk that misses the
last writes, and may start the guest on its own as soon as the stream ends.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hv.driver import InvalidRequest
from protocols.migration import MigrationPolicy, MigrationSample, MigrationStatus
from protocols.vmspec import DiskSpec, VmSpec

__all__ = [
    "JOB_PREFIX",
    "MIGRATING",
    "NBD_NODE_PREFIX",
    "POSTCOPY",
    "MigrationUri",
    "copied_disks",
    "destination_capabilities",
    "format_uri",
    "free_port",
    "local_disks_message",
    "migration_status",
    "parse_uri",
    "sample_from_query",
    "source_capabilities",
    "source_parameters",
    "status_of",
]

#: Block jobs and NBD client nodes the driver creates on a source are named with these prefixes.
JOB_PREFIX = "migrate-"
NBD_NODE_PREFIX = "migrate-nbd-"

#: ``query-migrate`` statuses of a source whose migration is under way (QEMU's own names).
MIGRATING = frozenset(
    {"setup", "active", "pre-switchover", "device", "wait-unplug", "postcopy-active", "postcopy-paused",
     "postcopy-recover"}
)  # fmt: skip
POSTCOPY = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})

#: QEMU ``query-migrate`` statuses that are steps inside pre-copy, as the engines report them.
_ACTIVE_STEPS = frozenset({"active", "pre-switchover", "device", "wait-unplug", "colo"})
_POSTCOPY_STEPS = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
_AS_IS: frozenset[str] = frozenset(
    {"none", "setup", "active", "postcopy-active", "completed", "failed", "cancelling", "cancelled"}
)


@dataclass(frozen=True, slots=True)
class MigrationUri:
    """A parsed destination URI: where memory goes, and where disks go when they are copied."""

    host: str
    port: int
    nbd_host: str | None = None
    nbd_port: int | None = None

    @property
    def qemu_uri(self) -> str:
        """The part QEMU's ``migrate`` takes."""
        return f"tcp:{_host_text(self.host)}:{self.port}"

    @property
    def has_nbd(self) -> bool:
        """Whether the URI names the destination's NBD server (for the storage copy)."""
        return self.nbd_host is not None and self.nbd_port is not None

    def __str__(self) -> str:
        return format_uri(self.host, self.port, self.nbd_host, self.nbd_port)


def format_uri(host: str, port: int, nbd_host: str | None = None, nbd_port: int | None = None) -> str:
    """The URI a destination hands out; see the module docstring."""
    uri = f"tcp:{_host_text(host)}:{port}"
    if nbd_host is not None and nbd_port is not None:
        uri += f";nbd={_host_text(nbd_host)}:{nbd_port}"
    return uri


def parse_uri(vm: str, uri: str) -> MigrationUri:
    """The parts of ``uri`` (``tcp:HOST:PORT`` with an optional ``;nbd=HOST:PORT``).

    Raises:
        InvalidRequest: it is not of that form.
    """
    head, _, rest = uri.partition(";")
    scheme, sep, address = head.partition(":")
    if scheme != "tcp" or not sep:
        raise InvalidRequest(
            f"vm {vm!r}: migration URI {uri!r} is not tcp:HOST:PORT[;nbd=HOST:PORT]; pass the URI that "
            "migrate_incoming returned on the destination"
        )
    host, port = _split_address(vm, uri, address)
    nbd_host = nbd_port = None
    if rest:
        key, sep, nbd_address = rest.partition("=")
        if key != "nbd" or not sep:
            raise InvalidRequest(
                f"vm {vm!r}: migration URI {uri!r} has an unknown part {rest!r} (only nbd=HOST:PORT may "
                "follow the ';'); pass the URI that migrate_incoming returned"
            )
        nbd_host, nbd_port = _split_address(vm, uri, nbd_address)
    return MigrationUri(host=host, port=port, nbd_host=nbd_host, nbd_port=nbd_port)


def _split_address(vm: str, uri: str, address: str) -> tuple[str, int]:
    if address.startswith("["):
        host, sep, port_text = address[1:].partition("]:")
    else:
        host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidRequest(
            f"vm {vm!r}: migration URI {uri!r}: {address!r} is not HOST:PORT with a port of 1-65535; "
            "pass the URI that migrate_incoming returned on the destination"
        )
    return host, int(port_text)


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def free_port(host: str) -> int:
    """A TCP port on ``host`` that is free now (the kernel's pick; bound once to be sure).

    Raises:
        OSError: ``host`` is not an address of this machine (or cannot be resolved).
    """
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def copied_disks(spec: VmSpec) -> list[DiskSpec]:
    """The disks a migration must copy: those with a local overlay (a read-only disk has none, and a
    disk without an overlay is the shared image itself, at the same path on both hosts).
    """
    return [disk for disk in spec.disks if disk.overlay and not disk.readonly]


def _caps(**states: bool) -> list[dict[str, object]]:
    return [{"capability": name.replace("_", "-"), "state": state} for name, state in states.items()]


def source_capabilities(policy: MigrationPolicy, *, copy_storage: bool) -> list[dict[str, object]]:
    """``migrate-set-capabilities`` for the source: every one set, so nothing of an earlier attempt
    lingers.
    """
    return _caps(
        events=True,
        auto_converge=policy.auto_converge,
        xbzrle=policy.xbzrle,
        multifd=policy.multifd,
        postcopy_ram=policy.postcopy,
        pause_before_switchover=copy_storage,
    )


def destination_capabilities(policy: MigrationPolicy | None, *, postcopy: bool) -> list[dict[str, object]]:
    """``migrate-set-capabilities`` for the destination, before ``migrate-incoming``. Multifd and
    post-copy must be on at both ends; the rest is the source's business.
    """
    multifd = policy is not None and policy.multifd
    return _caps(events=True, multifd=multifd, postcopy_ram=postcopy)


def source_parameters(policy: MigrationPolicy) -> dict[str, object]:
    """``migrate-set-parameters`` for the source. The bandwidth is always set: QEMU's own default
    (128 MiB/s) is nobody's choice.
    """
    params: dict[str, object] = {
        "max-bandwidth": max(1, int(policy.bandwidth_mib_s * 1024 * 1024)),
        "downtime-limit": policy.max_downtime_ms,
    }
    if policy.xbzrle:
        params["xbzrle-cache-size"] = policy.xbzrle_cache_mib * 1024 * 1024
    if policy.multifd:
        params["multifd-channels"] = policy.multifd_channels
    return params


def migration_status(result: object) -> str:
    """QEMU's own ``query-migrate`` status (``none`` before any migration)."""
    if isinstance(result, dict):
        return str(result.get("status", "none"))
    return "none"


def local_disks_message(name: str, disks: Sequence[DiskSpec]) -> str:
    """The error for local disks that a migration without storage copy would leave behind."""
    listed = ", ".join(f"{d.target} (an overlay on {d.source})" for d in disks)
    return (
        f"vm {name!r} has local disks the destination does not have: {listed}; migrate with "
        "copy_storage=True to copy them with a block mirror, or keep such VMs on shared storage "
        "(disks with overlay=False, at the same path on both hosts)"
    )


def status_of(qemu_status: str) -> MigrationStatus:
    """QEMU's ``query-migrate`` status in the engines' vocabulary (its inner steps fold into
    ``active`` and ``postcopy-active``).
    """
    if qemu_status in _ACTIVE_STEPS:
        return "active"
    if qemu_status in _POSTCOPY_STEPS:
        return "postcopy-active"
    if qemu_status in _AS_IS:
        return qemu_status  # type: ignore[return-value]  # one of the Literal's values, checked above
    return "active"


def sample_from_query(
    info: Mapping[str, Any], *, disk_total: int = 0, disk_remaining: int = 0
) -> MigrationSample:
    """A :class:`MigrationSample` from ``query-migrate``'s answer; ``disk_*`` add what the storage
    mirrors still have to copy.
    """
    status = status_of(str(info.get("status", "none")))
    ram = info.get("ram")
    ram = ram if isinstance(ram, Mapping) else {}
    page_size = _int(ram.get("page-size")) or 4096
    completed = status == "completed"
    return MigrationSample(
        status=status,
        total_bytes=_int(ram.get("total")) + disk_total,
        transferred_bytes=_int(ram.get("transferred")),
        remaining_bytes=_int(ram.get("remaining")) + disk_remaining,
        dirty_rate_bytes_s=_float(ram.get("dirty-pages-rate")) * page_size,
        bandwidth_bytes_s=_float(ram.get("mbps")) * 1e6 / 8,
        iteration=_int(ram.get("dirty-sync-count")),
        expected_downtime_ms=_float(info.get("expected-downtime")),
        throttle_pct=_int(info.get("cpu-throttle-percentage")),
        downtime_ms=_float(info.get("downtime")) if completed else 0.0,
        total_ms=_float(info.get("total-time")) if completed else 0.0,
        error=str(info.get("error-desc", ""))[:4000] if status == "failed" else "",  # the wire allows 4096
    )


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
