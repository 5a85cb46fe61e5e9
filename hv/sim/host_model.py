"""The sim host model: capacity, CPU identity, the power model in watts and the VMs' wobbling load.

:class:`HostModel` is what a simulated machine is: cores, memory, disk, arch and CPU features, a
migration link, and a power draw linear in CPU use between ``power_idle_w`` and ``power_max_w``. It
also turns a VM's ``spec.workload`` into the CPU use and dirty rate it shows at a clock time, with a
small deterministic wobble per VM. It holds no VMs: callers pass them in.

Imports :mod:`hv.driver`, :mod:`hv.host_checks`, :mod:`hv.sim.vm` and :mod:`protocols`.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib.metadata
import math
from collections.abc import Collection, Iterable
from typing import NamedTuple

from hv.driver import POWERED_ON, InsufficientResources, VmStats
from hv.host_checks import require_free_memory
from hv.sim.vm import Phases, Vm
from protocols.messages import Capabilities
from protocols.vmspec import VmSpec

__all__ = ["DEFAULT_LINK_MIB_S", "DEFAULT_X86_FEATURES", "WOBBLE", "HostModel", "HostSample"]

#: The CPU flags of a plain modern x86 server with hardware virtualisation (VMX, EPT, VPID).
DEFAULT_X86_FEATURES: tuple[str, ...] = (
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
    "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "ht", "syscall", "nx", "pdpe1gb",
    "rdtscp", "lm", "constant_tsc", "nopl", "pni", "pclmulqdq", "vmx", "ssse3", "fma", "cx16", "pcid",
    "sse4_1", "sse4_2", "x2apic", "movbe", "popcnt", "tsc_deadline_timer", "aes", "xsave", "avx", "f16c",
    "rdrand", "hypervisor", "lahf_lm", "abm", "fsgsbase", "bmi1", "avx2", "smep", "bmi2", "erms",
    "invpcid", "rdseed", "adx", "smap", "clflushopt", "xsaveopt", "xsavec", "xgetbv1", "tpr_shadow",
    "vnmi", "flexpriority", "ept", "vpid", "ept_ad", "vmx_unrestricted_guest",
)  # fmt: skip

_DEFAULT_FEATURES: dict[str, tuple[str, ...]] = {
    "x86_64": DEFAULT_X86_FEATURES,
    "i386": DEFAULT_X86_FEATURES,
    "aarch64": ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "cpuid"),
    "ppc64le": ("altivec", "vsx", "arch_3_00"),
    "s390x": ("esan3", "zarch", "stfle", "msa", "ldisp", "eimm", "dfp", "sie"),
    "riscv64": ("rv64imafdc", "h"),
}
_CPU_VENDORS = {
    "x86_64": "GenuineIntel", "i386": "GenuineIntel", "aarch64": "ARM", "ppc64le": "IBM", "s390x": "IBM/S390"
}  # fmt: skip

#: Migration link speed of a sim host: 10 GbE less protocol overhead, in MiB/s.
DEFAULT_LINK_MIB_S = 1170.0

#: How far the sim lets a VM's CPU use and dirty rate stray from its workload: +-10 %.
WOBBLE = 0.10


def _engine_version() -> str:
    try:
        return importlib.metadata.version("fleetvisor")
    except importlib.metadata.PackageNotFoundError:
        return "1"


_ENGINE_VERSION = _engine_version()


class HostSample(NamedTuple):
    """The host's own resource use right now, as telemetry reports it."""

    cpu_util: float
    memory_used_mib: int
    power_w: float


class HostModel:
    """One simulated machine's fixed properties, and the load its VMs put on it.

    Raises (constructor):
        ValueError: a non-positive size or link speed, or ``power_max_w`` below ``power_idle_w``.
    """

    def __init__(
        self,
        *,
        host_id: str,
        cores: int,
        memory_mib: int,
        disk_gib: int,
        arch: str,
        cpu_features: Iterable[str] | None,
        power_idle_w: float,
        power_max_w: float,
        seed: int,
        migration_bandwidth_mib_s: float,
    ) -> None:
        _check_sizes(host_id, cores, memory_mib, disk_gib, migration_bandwidth_mib_s)
        if not 0 <= power_idle_w <= power_max_w:
            raise ValueError(
                f"sim host {host_id!r}: need 0 <= power_idle_w <= power_max_w, "
                f"got idle {power_idle_w} W and max {power_max_w} W"
            )
        self.host_id = host_id
        self.cores = cores
        self.memory_mib = memory_mib
        self.disk_gib = disk_gib
        self.arch = arch
        self.cpu_features = (
            builtins.list(cpu_features)
            if cpu_features is not None
            else builtins.list(_DEFAULT_FEATURES.get(arch, ()))
        )
        self.power_idle_w = float(power_idle_w)
        self.power_max_w = float(power_max_w)
        self.seed = seed
        self.migration_bandwidth_mib_s = float(migration_bandwidth_mib_s)
        self.guest_arches = [arch, "i386"] if arch == "x86_64" else [arch]

    def capabilities(self) -> Capabilities:
        """The host as the Driver interface describes it."""
        return Capabilities(
            engine="sim",
            engine_version=_ENGINE_VERSION,
            arch=self.arch,
            cpu_vendor=_CPU_VENDORS.get(self.arch, ""),
            cpu_model="Fleetvisor Sim CPU",
            cpu_features=builtins.list(self.cpu_features),
            accel="sim",
            cores=self.cores,
            memory_mib=self.memory_mib,
            disk_gib=self.disk_gib,
            guest_arches=builtins.list(self.guest_arches),
            machine_types=["pc", "q35", "microvm"],
            power_idle_w=self.power_idle_w,
            power_max_w=self.power_max_w,
        )

    def require_fits(self, spec: VmSpec, defined: Collection[Vm]) -> None:
        """Refuse ``spec`` unless this host runs its arch and has its memory free beside ``defined``.

        Raises:
            InsufficientResources: the guest arch is foreign, or memory is short (vCPUs may overcommit).
        """
        if spec.arch not in self.guest_arches:
            raise InsufficientResources(
                f"vm {spec.name!r} is {spec.arch} but host {self.host_id!r} runs only "
                f"{', '.join(self.guest_arches)} guests; place it on a {spec.arch} host"
            )
        require_free_memory(
            spec,
            host_id=self.host_id,
            memory_mib=self.memory_mib,
            committed_mib=sum(vm.spec.memory_mib for vm in defined),
            defined_vms=len(defined),
        )

    def phases(self, name: str) -> Phases:
        """Per-VM wobble parameters from the seed and the name, stable across processes (no ``hash()``).

        Each metric gets (phase, period of the slow wave, period of the fast wave).
        """
        digest = hashlib.blake2b(f"{self.seed}:{name}".encode(), digest_size=12).digest()
        u = [int.from_bytes(digest[i : i + 2], "big") / 65535.0 for i in range(0, 12, 2)]
        return (
            u[0] * 2 * math.pi, 60.0 + u[1] * 240.0, 7.0 + u[2] * 23.0,
            u[3] * 2 * math.pi, 60.0 + u[4] * 240.0, 7.0 + u[5] * 23.0,
        )  # fmt: skip

    def vm_stats(self, vm: Vm, now: float) -> VmStats:
        """A sample of ``vm`` at clock time ``now``; a VM that is not running uses no CPU and dirties nothing."""
        running = vm.state == "running"
        dirty = _wobbled(vm.spec.workload.dirty_mib_s, vm.phases[3:], now) * vm.unthrottled()
        return VmStats(
            name=vm.spec.name,
            state=vm.state,
            cpu_util=_cpu_util(vm, now) if running else 0.0,
            dirty_mib_s=dirty if running else 0.0,
            memory_mib=vm.spec.memory_mib,
        )

    def sample(self, vms: Iterable[Vm], now: float) -> HostSample:
        """The host's CPU use (0..1), memory held by powered-on and incoming VMs, and power draw at ``now``."""
        busy_cores = 0.0
        memory_used = 0
        for vm in vms:
            if vm.state in POWERED_ON or vm.state == "incoming":
                memory_used += vm.spec.memory_mib
            if vm.state == "running":
                busy_cores += _cpu_util(vm, now) * vm.spec.vcpus
        host_util = min(1.0, busy_cores / self.cores)
        power_w = self.power_idle_w + (self.power_max_w - self.power_idle_w) * host_util
        return HostSample(cpu_util=host_util, memory_used_mib=memory_used, power_w=power_w)


def _cpu_util(vm: Vm, now: float) -> float:
    """The share of its vCPUs a running ``vm`` uses at ``now`` (its workload, wobbled, less throttle)."""
    return min(1.0, _wobbled(vm.spec.workload.cpu_util, vm.phases[:3], now)) * vm.unthrottled()


def _check_sizes(
    host_id: str, cores: int, memory_mib: int, disk_gib: int, migration_bandwidth_mib_s: float
) -> None:
    for field, value in (("cores", cores), ("memory_mib", memory_mib)):
        if value < 1:
            raise ValueError(f"sim host {host_id!r}: {field} must be at least 1, got {value}")
    if disk_gib < 0:
        raise ValueError(f"sim host {host_id!r}: disk_gib must not be negative, got {disk_gib}")
    if not (math.isfinite(migration_bandwidth_mib_s) and migration_bandwidth_mib_s > 0):
        raise ValueError(
            f"sim host {host_id!r}: migration_bandwidth_mib_s must be a positive number of MiB/s, "
            f"got {migration_bandwidth_mib_s}"
        )


def _wobbled(base: float, phases: tuple[float, ...], now: float) -> float:
    """``base`` varied by at most +-WOBBLE, smoothly in time: a slow and a fast sine wave."""
    phase, slow_period, fast_period = phases
    wave = 0.7 * math.sin(2 * math.pi * now / slow_period + phase) + 0.3 * math.sin(
        2 * math.pi * now / fast_period + 2 * phase
    )
    return max(0.0, base * (1.0 + WOBBLE * wave))
