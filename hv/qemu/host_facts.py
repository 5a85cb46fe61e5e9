"""What the qemu engine learns about its host when it opens: QEMU's answers, the accelerator, and
the :class:`~protocols.messages.Capabilities` it reports.

:func:`learn_host` runs once per open; :class:`HostFacts` is the result the other parts read.
Imports: :mod:`hv.driver` (errors), :mod:`hv.qemu.accel`, :mod:`hv.qemu.host`,
:mod:`hv.qemu.files` and :mod:`protocols.messages` only.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hv.driver import EngineError
from hv.qemu import accel as accel_mod
from hv.qemu import host
from hv.qemu.files import make_private_dir
from protocols.messages import Capabilities

__all__ = ["HostFacts", "learn_host"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class HostFacts:
    """QEMU's introspection, the chosen accelerator and the host's capabilities."""

    info: host.QemuInfo
    accel: accel_mod.AccelChoice
    caps: Capabilities


@dataclass(frozen=True, kw_only=True)
class HostSettings:
    """The driver options :func:`learn_host` needs."""

    host_id: str
    state_dir: Path
    cache_dir: Path
    qemu_binary: str
    accel_mode: accel_mod.AccelMode
    sandbox: bool
    kvm_probe_timeout_s: float
    power_idle_w: float
    power_max_w: float


async def learn_host(settings: HostSettings) -> HostFacts:
    """Ask QEMU what it offers (cached), choose the accelerator and describe the host.

    Raises:
        EngineError: QEMU is missing or lacks the sandbox, ``accel=kvm`` without a usable
            ``/dev/kvm``, or ``/proc`` cannot be read.
    """
    make_private_dir(settings.cache_dir)
    binary = Path(settings.qemu_binary)
    info = await host.introspect_qemu(binary, settings.cache_dir / "qemu-info.json")
    if settings.sandbox and not info.sandbox:
        raise EngineError(
            f"{settings.qemu_binary} was built without seccomp, so it cannot run VMs under -sandbox on; "
            "install a QEMU with seccomp support (Debian's has it), or pass sandbox=False to run "
            "VMs unconfined"
        )
    accel = await accel_mod.choose_accel(
        settings.accel_mode,
        binary=binary,
        qemu_version=info.version,
        machine_types=info.machine_types,
        sandbox=info.sandbox and settings.sandbox,
        work_dir=settings.cache_dir,
        cache_file=settings.cache_dir / "accel-probe.json",
        timeout_s=settings.kvm_probe_timeout_s,
    )
    log.info("qemu host %s: QEMU %s, %s", settings.host_id, info.version, accel.reason)
    cpu = host.parse_cpuinfo(_read_text("/proc/cpuinfo"))
    disk_gib = 0
    with contextlib.suppress(OSError):
        disk_gib = shutil.disk_usage(settings.state_dir).free // (1024**3)
    arches = host.guest_arches(binary.parent)
    caps = Capabilities(
        engine="qemu",
        engine_version=info.version,
        arch=os.uname().machine,
        cpu_vendor=cpu.vendor,
        cpu_model=cpu.model,
        cpu_features=host.reported_cpu_features(cpu.flags),
        accel=accel.accel,
        cores=os.cpu_count() or 1,
        memory_mib=host.parse_meminfo_mib(_read_text("/proc/meminfo")),
        disk_gib=disk_gib,
        guest_arches=[a for a in arches if a in host.SUPPORTED_ARCHES],
        machine_types=builtins.list(info.machine_types),
        power_idle_w=settings.power_idle_w,
        power_max_w=settings.power_max_w,
    )
    return HostFacts(info=info, accel=accel, caps=caps)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise EngineError(f"cannot read {path}: {exc.strerror or exc}; is /proc mounted?") from exc
