"""The sim hypervisor engine: a deterministic, in-memory stand-in for a host and its VMs.

:class:`SimDriver` implements :class:`hv.driver.Driver` without running any guest. It models a host
(arch, cores, memory, CPU features, a linear power model in watts) and its VMs (vCPUs, memory, boot
delay, CPU utilisation and dirty-page rate taken from ``spec.workload`` with a small deterministic
wobble). It powers the demo, fleet-scale tests with thousands of hosts in one process, and
trace-driven evaluation, so it is cheap: a driver owns no task, and a booting VM is one timer on the
shared :class:`hv.sim.clock.Clock`.

Like a real engine, its VMs outlive the agent: with a ``state_dir`` the VM table is written to
``sim-vms.json`` after every change and read back by :meth:`SimDriver.open`; :meth:`SimDriver.close`
leaves VMs as they are.

Live migrations (:mod:`hv.sim.migration`) follow the pre-copy model of :mod:`protocols.migration` on
the driver's clock. The source and destination are two drivers that never talk to each other: the
destination only holds an ``incoming`` copy until ``migrate_finish``, and the source replays its
migration from a persisted record whenever someone looks (``migrate_sample``, ``list``, ...).

Every call runs to completion without awaiting, so calls on one driver never interleave.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib.metadata
import math
import pathlib
from collections.abc import Iterable
from typing import Literal, NamedTuple

import msgspec

from hv.driver import (
    POWERED_OFF,
    POWERED_ON,
    Driver,
    DriverEvent,
    EngineError,
    InsufficientResources,
    InvalidRequest,
    InvalidState,
    VmExists,
    VmStats,
    not_open,
    require_state,
    unknown_vm,
)
from hv.sim.clock import Clock, RealClock, TimerHandle
from hv.sim.migration import MigrationEvent, MigrationRun, SavedMigration
from hv.storage import write_atomic
from protocols.messages import Capabilities, VmPowerState, VmStatus
from protocols.migration import MigrationPolicy, MigrationSample, check_policy
from protocols.vmspec import HOST_ID_RE, VmSpec, VmWorkload

__all__ = ["DEFAULT_LINK_MIB_S", "DEFAULT_X86_FEATURES", "STATE_FILE", "HostSample", "SimDriver"]

#: File name of the persisted VM table inside ``state_dir``.
STATE_FILE = "sim-vms.json"

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

#: Lifecycle order, for messages that list states.
_URI_SCHEME = "sim://"
#: What the source VM's ``reason`` starts with once its guest runs on the destination.
MIGRATED_REASON = "migrated to "


class HostSample(NamedTuple):
    """The host's own resource use right now, as telemetry reports it."""

    cpu_util: float
    memory_used_mib: int
    power_w: float


class _SavedVm(msgspec.Struct, frozen=True, kw_only=True):
    spec: VmSpec
    state: VmPowerState
    started_at: float | None = None
    reason: str = ""
    #: When a ``starting`` VM becomes ``running`` (clock time).
    boot_done_at: float | None = None
    #: The VM's latest outgoing live migration, kept until the VM is undefined or migrates again.
    migration: SavedMigration | None = None


class _SavedTable(msgspec.Struct, frozen=True, kw_only=True):
    """The on-disk form of a driver's VM table. ``version`` changes when the layout does."""

    version: Literal[1] = 1
    host_id: str
    vms: builtins.list[_SavedVm] = []


class _Vm:
    """One VM's mutable runtime record inside a driver."""

    __slots__ = (
        "boot_done_at", "boot_timer", "migration", "phases", "reason", "spec", "started_at", "state",
    )  # fmt: skip

    def __init__(
        self,
        spec: VmSpec,
        state: VmPowerState,
        phases: tuple[float, float, float, float, float, float],
        started_at: float | None = None,
        reason: str = "",
        boot_done_at: float | None = None,
    ) -> None:
        self.spec = spec
        self.state: VmPowerState = state
        self.phases = phases
        self.started_at = started_at
        self.reason = reason
        self.boot_done_at = boot_done_at
        self.boot_timer: TimerHandle | None = None
        self.migration: MigrationRun | None = None

    def status(self) -> VmStatus:
        return VmStatus(
            name=self.spec.name,
            state=self.state,
            spec=self.spec,
            started_at=self.started_at,
            reason=self.reason,
        )

    def saved(self) -> _SavedVm:
        return _SavedVm(
            spec=self.spec,
            state=self.state,
            started_at=self.started_at,
            reason=self.reason,
            boot_done_at=self.boot_done_at,
            migration=None if self.migration is None else self.migration.saved,
        )

    def cancel_boot(self) -> None:
        if self.boot_timer is not None:
            self.boot_timer.cancel()
            self.boot_timer = None
        self.boot_done_at = None


def _engine_version() -> str:
    try:
        return importlib.metadata.version("fleetvisor")
    except importlib.metadata.PackageNotFoundError:
        return "1"


_ENGINE_VERSION = _engine_version()


class SimDriver(Driver):
    """A simulated host. Deterministic for a given ``seed``, clock and sequence of calls.

    Pass a shared :class:`hv.sim.clock.VirtualClock` as ``clock`` to run many hosts in simulated
    time; the default is the wall clock. ``migration_bandwidth_mib_s`` is the host's migration link;
    a migration uses the smaller of it and its policy's bandwidth.

    Raises (constructor):
        ValueError: an invalid host id, a non-positive size or link speed, or ``power_max_w`` below
            ``power_idle_w``.
    """

    name = "sim"

    def __init__(
        self,
        *,
        host_id: str,
        state_dir: pathlib.Path | None = None,
        cores: int = 16,
        memory_mib: int = 65536,
        disk_gib: int = 1000,
        arch: str = "x86_64",
        cpu_features: builtins.list[str] | None = None,
        power_idle_w: float = 100.0,
        power_max_w: float = 250.0,
        clock: Clock | None = None,
        seed: int = 0,
        migration_bandwidth_mib_s: float = DEFAULT_LINK_MIB_S,
    ) -> None:
        super().__init__()
        if not HOST_ID_RE.fullmatch(host_id):
            raise ValueError(
                f"host id {host_id!r} is invalid: use 1-64 letters, digits, '.', '_' and '-', "
                "starting and ending with a letter or digit"
            )
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
        if not 0 <= power_idle_w <= power_max_w:
            raise ValueError(
                f"sim host {host_id!r}: need 0 <= power_idle_w <= power_max_w, "
                f"got idle {power_idle_w} W and max {power_max_w} W"
            )
        self.host_id = host_id
        self.state_dir = state_dir
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
        self.clock: Clock = clock if clock is not None else RealClock()
        self.seed = seed
        self.migration_bandwidth_mib_s = float(migration_bandwidth_mib_s)
        self.guest_arches = [arch, "i386"] if arch == "x86_64" else [arch]
        self._vms: dict[str, _Vm] = {}
        self._open = False

    @property
    def state_file(self) -> pathlib.Path | None:
        """Where the VM table is persisted, or None when the driver keeps it in memory only."""
        return None if self.state_dir is None else self.state_dir / STATE_FILE

    # ---------------------------------------------------------------------------------------------
    # Driver lifetime
    # ---------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Re-attach to the VMs: those a previous driver left in ``state_dir`` (or, without one, those
        this driver had before :meth:`close`). Boots that came due meanwhile finish now, with their
        ``started`` events; the others resume waiting on the clock.

        Raises:
            EngineError: the state file cannot be read or decoded, or belongs to another host.
        """
        self._detach()
        if self.state_file is not None:
            self._vms = self._load(self.state_file)
        self._open = True
        finished: builtins.list[_Vm] = []
        for vm in self._vms.values():
            if vm.state == "starting" and vm.boot_done_at is not None:
                if vm.boot_done_at <= self.clock.now():
                    finished.append(vm)
                else:
                    vm.boot_timer = self.clock.call_at(vm.boot_done_at, _BootDone(self, vm))
            elif vm.state == "starting":
                finished.append(vm)
        for vm in finished:
            self._finish_boot(vm)

    async def close(self) -> None:
        """Detach: pending boot timers are dropped, VMs keep their state (and on disk, their file)."""
        self._detach()
        self._open = False

    def _detach(self) -> None:
        for vm in self._vms.values():
            if vm.boot_timer is not None:
                vm.boot_timer.cancel()
                vm.boot_timer = None

    async def capabilities(self) -> Capabilities:
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

    # ---------------------------------------------------------------------------------------------
    # Lifecycle
    # ---------------------------------------------------------------------------------------------

    async def define(self, spec: VmSpec) -> VmStatus:
        """Create a VM in state ``defined``.

        Raises:
            VmExists: a VM of that name is already defined here.
            InsufficientResources: the host cannot run the guest's arch, or the memory of all defined
                VMs plus this one exceeds the host's memory (vCPUs may overcommit, memory may not).
            EngineError: the driver is not open, or the state file cannot be written.
        """
        self._require_open()
        existing = self._vms.get(spec.name)
        if existing is not None:
            raise VmExists(
                f"vm {spec.name!r} already exists on host {self.host_id!r} (it is {existing.state}); "
                "pick another name, or undefine the existing VM first"
            )
        self._require_fits(spec)
        vm = _Vm(spec, "defined", _phases(self.seed, spec.name))
        self._vms[spec.name] = vm
        self._save()
        return vm.status()

    async def start(self, name: str) -> VmStatus:
        """Power a defined, stopped or crashed VM on.

        With ``spec.workload.boot_s > 0`` the VM is ``starting`` for that many seconds of clock time,
        then becomes ``running`` and a ``started`` event is emitted; otherwise it is running at once.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is already powered on (starting, running or paused).
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        self._require_state(vm, "start", POWERED_OFF)
        now = self.clock.now()
        vm.started_at = now
        vm.reason = ""
        boot_s = vm.spec.workload.boot_s
        if boot_s > 0:
            vm.state = "starting"
            vm.boot_done_at = now + boot_s
            vm.boot_timer = self.clock.call_at(vm.boot_done_at, _BootDone(self, vm))
        else:
            vm.state = "running"
        self._save()
        return vm.status()

    async def shutdown(self, name: str, timeout_s: float) -> VmStatus:
        """Power a starting, running or paused VM off gracefully (the sim's guests always comply).

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not powered on.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        self._require_state(vm, "shutdown", POWERED_ON)
        self._power_off(vm, "stopped")
        return vm.status()

    async def destroy(self, name: str) -> VmStatus:
        """Power a VM off at once. A VM that is already off (defined or stopped) is left as it is.

        A crashed VM becomes ``stopped``.

        Raises:
            UnknownVm: no VM of that name.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        if vm.state in ("defined", "stopped"):
            return vm.status()
        self._power_off(vm, "stopped")
        return vm.status()

    async def pause(self, name: str) -> VmStatus:
        """Freeze a running VM's vCPUs: it keeps its memory but uses no CPU and dirties no pages.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        self._require_state(vm, "pause", frozenset({"running"}))
        vm.state = "paused"
        self._save()
        return vm.status()

    async def resume(self, name: str) -> VmStatus:
        """Unfreeze a paused VM.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not paused.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        self._require_state(vm, "resume", frozenset({"paused"}))
        vm.state = "running"
        self._save()
        return vm.status()

    async def reboot(self, name: str) -> VmStatus:
        """Reset a running guest: it stays running and its ``started_at`` becomes now.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        self._require_state(vm, "reboot", frozenset({"running"}))
        vm.started_at = self.clock.now()
        self._save()
        return vm.status()

    async def undefine(self, name: str) -> None:
        """Forget a VM that is powered off (defined, stopped or crashed), or an ``incoming`` copy.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is powered on.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        self._require_state(vm, "undefine", POWERED_OFF | {"incoming"})
        del self._vms[name]
        self._save()

    async def list(self) -> builtins.list[VmStatus]:
        """Every VM on this host, sorted by name, ``incoming`` copies included.

        Raises:
            EngineError: the driver is not open.
        """
        self._require_open()
        self._sync_migrations()
        return [self._vms[name].status() for name in sorted(self._vms)]

    async def stats(self) -> builtins.list[VmStats]:
        """A sample of every running or paused VM at the clock's current time, sorted by name.

        ``incoming`` copies are not sampled: they run no guest yet.

        Raises:
            EngineError: the driver is not open.
        """
        self._require_open()
        self._sync_migrations()
        now = self.clock.now()
        return [
            self._sample(vm, now)
            for name in sorted(self._vms)
            if (vm := self._vms[name]).state in ("running", "paused")
        ]

    # ---------------------------------------------------------------------------------------------
    # Live migration
    # ---------------------------------------------------------------------------------------------

    async def migrate_incoming(
        self, spec: VmSpec, listen_host: str, *, policy: MigrationPolicy | None = None
    ) -> tuple[VmStatus, str]:
        """Destination: hold ``spec`` in state ``incoming`` and return it with ``sim://HOST/NAME``.

        The copy holds its memory like any defined VM but runs nothing until :meth:`migrate_finish`.
        ``listen_host`` is not used: sim drivers exchange no data. Idempotent for an incoming copy.

        Raises:
            VmExists: a VM of that name is here and is not incoming.
            InsufficientResources: as :meth:`define`.
            InvalidRequest: ``policy`` is inconsistent (see :func:`protocols.migration.check_policy`).
            EngineError: the driver is not open, or the state file cannot be written.
        """
        self._require_open()
        uri = self.migration_uri(spec.name)
        existing = self._vms.get(spec.name)
        if existing is not None:
            if existing.state == "incoming":
                return existing.status(), uri
            raise VmExists(
                f"vm {spec.name!r} already exists on host {self.host_id!r} (it is {existing.state}), so it "
                "cannot be migrated here; pick another destination, or undefine the VM here first"
            )
        if policy is not None:
            self._require_valid_policy(spec.name, policy)
        self._require_fits(spec)
        vm = _Vm(spec, "incoming", _phases(self.seed, spec.name))
        self._vms[spec.name] = vm
        self._save()
        return vm.status(), uri

    def migration_uri(self, name: str) -> str:
        """Where a source sends VM ``name`` to reach this host: ``sim://HOST/NAME``."""
        return f"{_URI_SCHEME}{self.host_id}/{name}"

    async def migrate_send(self, name: str, uri: str, policy: MigrationPolicy) -> None:
        """Source: start migrating a running VM to ``uri`` under ``policy``.

        The bandwidth is the smaller of ``policy.bandwidth_mib_s`` and this host's link
        (``migration_bandwidth_mib_s``); the guest's dirty rate is its workload's ``dirty_mib_s``
        (changes through :meth:`set_workload` apply from then on). A migration to the same ``uri`` that is
        under way or has completed is left as it is.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running, or it is already migrating to another URI.
            InvalidRequest: ``uri`` is not a sim URI of another host, or ``policy`` is inconsistent.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        run = vm.migration
        # A completed migration is attached to by its own URI only; elsewhere, a source that was made
        # to run again (resumed by hand) may migrate anew.
        if run is not None and (run.under_way or (run.phase == "completed" and run.saved.uri == uri)):
            if run.saved.uri != uri:
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} is already migrating to {run.saved.uri} "
                    f"({run.phase}); cancel that migration before sending it to {uri}"
                )
            return
        if not uri.startswith(_URI_SCHEME) or uri.count("/") != 3 or not uri.endswith(f"/{name}"):
            raise InvalidRequest(
                f"vm {name!r}: {uri!r} is not a sim migration URI for it; a sim host sends only to "
                f"another sim host, to the URI its migrate_incoming returned (sim://HOST/{name})"
            )
        if uri == self.migration_uri(name):
            raise InvalidRequest(
                f"vm {name!r}: {uri} is this host ({self.host_id!r}); migrate it to another host"
            )
        self._require_valid_policy(name, policy)
        self._require_state(vm, "migrate", frozenset({"running"}))
        saved = SavedMigration(
            uri=uri,
            started_at=self.clock.now(),
            policy=policy,
            memory_mib=float(vm.spec.memory_mib),
            dirty_mib_s=vm.spec.workload.dirty_mib_s,
            bandwidth_mib_s=min(policy.bandwidth_mib_s, self.migration_bandwidth_mib_s),
        )
        vm.migration = MigrationRun(saved)
        self._save()

    async def migrate_sample(self, name: str) -> MigrationSample:
        """Source: the migration's progress at the clock's current time; status ``none`` if none.

        Raises:
            UnknownVm: no VM of that name.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        return MigrationSample(status="none") if vm.migration is None else vm.migration.sample()

    async def migrate_tune(self, name: str, *, downtime_ms: int) -> None:
        """Source: allow ``downtime_ms`` from now on; it counts from the next round's end.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: no pre-copy migration of the VM is under way.
            InvalidRequest: ``downtime_ms`` is below 1.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        run = self._require_precopy(vm, "tune")
        if downtime_ms < 1:
            raise InvalidRequest(f"vm {name!r}: downtime_ms must be at least 1, got {downtime_ms}")
        run.record(MigrationEvent(at=self.clock.now(), kind="tune", value=float(downtime_ms)))
        self._save()

    async def migrate_postcopy(self, name: str) -> None:
        """Source: switch to post-copy. The guest leaves the source at once (``paused``, migrated) and
        the migration completes once what is still dirty has been sent.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: no pre-copy migration is under way, or its policy does not allow post-copy.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        run = self._require_precopy(vm, "switch to post-copy")
        if not run.saved.policy.postcopy:
            raise InvalidState(
                f"vm {name!r} on host {self.host_id!r}: the migration's policy does not allow post-copy; "
                "cancel it and send again with postcopy allowed"
            )
        run.record(MigrationEvent(at=self.clock.now(), kind="postcopy"))
        self._sync(vm)
        self._save()

    async def migrate_cancel(self, name: str) -> VmStatus:
        """Source: cancel a pre-copy migration under way, and make sure a paused VM runs again.

        With no migration under way (none, cancelled or failed) only the second half applies. A VM that
        is powered off is returned as it is: starting it is the caller's decision.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the migration completed or is in post-copy: the guest runs on the destination.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        run = vm.migration
        if run is not None and run.phase in ("completed", "postcopy"):
            raise InvalidState(
                f"vm {name!r} on host {self.host_id!r}: its migration to {run.saved.uri} is "
                f"{'completed' if run.phase == 'completed' else 'in post-copy'} and cannot be cancelled; "
                "the guest runs on the destination now"
            )
        if run is not None and run.under_way:
            run.record(MigrationEvent(at=self.clock.now(), kind="cancel"))
        if vm.state == "paused":
            vm.state = "running"
            vm.reason = ""
        self._save()
        return vm.status()

    async def migrate_finish(self, name: str) -> VmStatus:
        """Destination: make the incoming copy an ordinary running VM (a running VM is returned as is).

        The sim destination cannot tell whether the stream completed: that is the caller's call.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is neither incoming nor running.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        if vm.state == "running":
            return vm.status()
        if vm.state != "incoming":
            raise InvalidState(
                f"vm {name!r} on host {self.host_id!r} is {vm.state}, not an incoming migration copy; "
                "migrate_finish applies to a VM created by migrate_incoming"
            )
        vm.state = "running"
        vm.started_at = self.clock.now()
        vm.reason = ""
        self._save()
        return vm.status()

    # ---------------------------------------------------------------------------------------------
    # Simulation controls (not part of Driver)
    # ---------------------------------------------------------------------------------------------

    def set_workload(
        self, name: str, cpu_util: float | None = None, dirty_mib_s: float | None = None
    ) -> None:
        """Change what a VM's guest pretends to do from now on (``None`` keeps the current value).

        The change is stored in the VM's ``spec.workload``, so it shows in :meth:`list` and persists.

        Raises:
            UnknownVm: no VM of that name.
            ValueError: ``cpu_util`` is outside 0..1 or ``dirty_mib_s`` outside 0..100000 (the VM
                spec's limits); nothing changes.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        changes: dict[str, float] = {}
        if cpu_util is not None:
            changes["cpu_util"] = cpu_util
        if dirty_mib_s is not None:
            changes["dirty_mib_s"] = dirty_mib_s
        if not changes:
            return
        # Convert rather than replace, so the new workload meets the same limits as one from the bus
        # (and the saved table stays loadable).
        try:
            workload = msgspec.convert({**msgspec.to_builtins(vm.spec.workload), **changes}, VmWorkload)
        except msgspec.ValidationError as exc:
            raise ValueError(
                f"vm {name!r}: workload rejected: {exc}; cpu_util must be within 0..1 and "
                "dirty_mib_s within 0..100000"
            ) from exc
        vm.spec = msgspec.structs.replace(vm.spec, workload=workload)
        run = vm.migration
        if dirty_mib_s is not None and run is not None and run.under_way:
            run.record(MigrationEvent(at=self.clock.now(), kind="dirty", value=workload.dirty_mib_s))
        self._save()

    def inject_crash(self, name: str, reason: str = "injected crash") -> VmStatus:
        """Make a powered-on VM crash, as if its guest or its emulator died, and emit ``crashed``.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not powered on.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._get(name)
        self._require_state(vm, "a crash", POWERED_ON)
        self._power_off(vm, "crashed", reason=reason)
        self.emit(DriverEvent(vm=name, event="crashed", state="crashed", reason=reason))
        return vm.status()

    def host_sample(self) -> HostSample:
        """The host's CPU use (0..1), memory held by powered-on VMs, and power draw, right now.

        ``incoming`` copies hold their memory but use no CPU. CPU use is the running VMs'
        ``cpu_util * vcpus`` (less auto-converge's throttle) summed over the host's cores, capped at 1;
        power is linear between ``power_idle_w`` and ``power_max_w`` in CPU use.

        Raises:
            EngineError: the driver is not open.
        """
        self._require_open()
        self._sync_migrations()
        now = self.clock.now()
        busy_cores = 0.0
        memory_used = 0
        for vm in self._vms.values():
            if vm.state in POWERED_ON or vm.state == "incoming":
                memory_used += vm.spec.memory_mib
            if vm.state == "running":
                busy_cores += self._cpu_util(vm, now) * vm.spec.vcpus
        cpu_util = min(1.0, busy_cores / self.cores)
        power_w = self.power_idle_w + (self.power_max_w - self.power_idle_w) * cpu_util
        return HostSample(cpu_util=cpu_util, memory_used_mib=memory_used, power_w=power_w)

    # ---------------------------------------------------------------------------------------------
    # Internals
    # ---------------------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if not self._open:
            raise not_open("sim", self.host_id)

    def _get(self, name: str) -> _Vm:
        self._require_open()
        vm = self._vms.get(name)
        if vm is None:
            raise unknown_vm(self.host_id, name, self._vms)
        self._sync(vm)
        return vm

    def _require_state(self, vm: _Vm, operation: str, allowed: Iterable[VmPowerState]) -> None:
        accepted = frozenset(allowed)
        if vm.state == "incoming" and "incoming" not in accepted:
            raise InvalidState(
                f"vm {vm.spec.name!r} on host {self.host_id!r} is incoming (a copy waiting for a live "
                f"migration); it cannot {operation}: finish the migration with migrate_finish, or discard "
                "the copy with destroy and undefine"
            )
        require_state(vm.spec.name, self.host_id, vm.state, operation, accepted)

    def _require_fits(self, spec: VmSpec) -> None:
        if spec.arch not in self.guest_arches:
            raise InsufficientResources(
                f"vm {spec.name!r} is {spec.arch} but host {self.host_id!r} runs only "
                f"{', '.join(self.guest_arches)} guests; place it on a {spec.arch} host"
            )
        committed = sum(vm.spec.memory_mib for vm in self._vms.values())
        free = self.memory_mib - committed
        if spec.memory_mib > free:
            raise InsufficientResources(
                f"vm {spec.name!r} needs {spec.memory_mib} MiB of memory but host {self.host_id!r} has "
                f"{free} MiB free ({committed} of {self.memory_mib} MiB held by {len(self._vms)} defined "
                "VMs); undefine VMs that are not needed or place it on another host"
            )

    def _require_valid_policy(self, name: str, policy: MigrationPolicy) -> None:
        problems = check_policy(policy)
        if problems:
            raise InvalidRequest(f"vm {name!r}: the migration policy is invalid: {'; '.join(problems)}")

    def _require_precopy(self, vm: _Vm, operation: str) -> MigrationRun:
        run = vm.migration
        if run is None or run.phase not in ("precopy", "stopcopy"):
            now = "no migration" if run is None else f"its migration is {run.sample().status}"
            raise InvalidState(
                f"vm {vm.spec.name!r} on host {self.host_id!r}: cannot {operation}: {now}; "
                "this needs a pre-copy migration under way (start one with migrate_send)"
            )
        return run

    def _sync_migrations(self) -> None:
        for vm in self._vms.values():
            self._sync(vm)

    def _sync(self, vm: _Vm) -> None:
        """Bring ``vm``'s migration up to the clock; a source whose guest has left becomes paused."""
        run = vm.migration
        if run is None:
            return
        run.advance(self.clock.now())
        if run.handover_at is None or run.saved.handed_over:
            return
        run.mark_handed_over()
        if vm.state in POWERED_ON:
            vm.cancel_boot()
            vm.state = "paused"
            vm.reason = f"{MIGRATED_REASON}{run.saved.uri}"
            self._save()
            self.emit(DriverEvent(vm=vm.spec.name, event="paused", state="paused", reason=vm.reason))
        else:
            self._save()

    def _power_off(self, vm: _Vm, state: Literal["stopped", "crashed"], reason: str = "") -> None:
        run = vm.migration
        if run is not None and run.under_way and vm.state != "incoming":
            why = f"the source VM was {'stopped' if state == 'stopped' else 'crashed: ' + reason}"
            run.record(MigrationEvent(at=self.clock.now(), kind="fail", reason=why))
        vm.cancel_boot()
        vm.state = state
        vm.started_at = None
        vm.reason = reason
        self._save()

    def _finish_boot(self, vm: _Vm) -> None:
        vm.boot_timer = None
        vm.boot_done_at = None
        vm.state = "running"
        self._save()
        self.emit(DriverEvent(vm=vm.spec.name, event="started", state="running"))

    def _sample(self, vm: _Vm, now: float) -> VmStats:
        running = vm.state == "running"
        dirty = _wobbled(vm.spec.workload.dirty_mib_s, vm.phases[3:], now) * _unthrottled(vm)
        return VmStats(
            name=vm.spec.name,
            state=vm.state,
            cpu_util=self._cpu_util(vm, now) if running else 0.0,
            dirty_mib_s=dirty if running else 0.0,
            memory_mib=vm.spec.memory_mib,
        )

    @staticmethod
    def _cpu_util(vm: _Vm, now: float) -> float:
        return min(1.0, _wobbled(vm.spec.workload.cpu_util, vm.phases[:3], now)) * _unthrottled(vm)

    # ---------------------------------------------------------------------------------------------
    # Persistence
    # ---------------------------------------------------------------------------------------------

    def _save(self) -> None:
        path = self.state_file
        if path is None:
            return
        table = _SavedTable(host_id=self.host_id, vms=[self._vms[n].saved() for n in sorted(self._vms)])
        data = msgspec.json.encode(table)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        except OSError as exc:
            raise EngineError(
                f"sim host {self.host_id!r} could not save its VM table to {path}: {exc.strerror or exc}; "
                "check that the state directory exists and is writable"
            ) from exc

    def _load(self, path: pathlib.Path) -> dict[str, _Vm]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise EngineError(
                f"sim host {self.host_id!r} could not read its VM table {path}: {exc.strerror or exc}; "
                "check the file's permissions"
            ) from exc
        try:
            table = msgspec.json.decode(data, type=_SavedTable)
        except msgspec.DecodeError as exc:
            raise EngineError(
                f"sim host {self.host_id!r} found a damaged VM table {path}: {exc}; "
                "restore it from a backup or move it away to start with no VMs"
            ) from exc
        if table.host_id != self.host_id:
            raise EngineError(
                f"sim host {self.host_id!r}: the VM table {path} belongs to host {table.host_id!r}; "
                "give each host its own state directory"
            )
        vms: dict[str, _Vm] = {}
        for saved in table.vms:
            vm = _Vm(
                saved.spec,
                saved.state,
                _phases(self.seed, saved.spec.name),
                started_at=saved.started_at,
                reason=saved.reason,
                boot_done_at=saved.boot_done_at,
            )
            if saved.migration is not None:
                vm.migration = MigrationRun(saved.migration)
            vms[saved.spec.name] = vm
        return vms


class _BootDone:
    """The timer callback that ends one VM's boot; a class so a stale timer can tell it is stale."""

    __slots__ = ("driver", "vm")

    def __init__(self, driver: SimDriver, vm: _Vm) -> None:
        self.driver = driver
        self.vm = vm

    def __call__(self) -> None:
        vm = self.vm
        # Stopping, crashing or closing cancels the timer; this check is the second line of defence, so
        # that only a VM still booting, and still this driver's, ever finishes.
        if vm.state != "starting" or self.driver._vms.get(vm.spec.name) is not vm:
            return
        self.driver._finish_boot(vm)


def _unthrottled(vm: _Vm) -> float:
    """The share of its vCPU time a VM gets while auto-converge throttles it (1 when not throttled)."""
    run = vm.migration
    if run is None or run.phase != "precopy":
        return 1.0
    return 1.0 - run.throttle / 100.0


def _phases(seed: int, name: str) -> tuple[float, float, float, float, float, float]:
    """Per-VM wobble parameters from ``seed`` and the name, stable across processes (no ``hash()``).

    Each metric gets (phase, period of the slow wave, period of the fast wave).
    """
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=12).digest()
    u = [int.from_bytes(digest[i : i + 2], "big") / 65535.0 for i in range(0, 12, 2)]
    return (
        u[0] * 2 * math.pi, 60.0 + u[1] * 240.0, 7.0 + u[2] * 23.0,
        u[3] * 2 * math.pi, 60.0 + u[4] * 240.0, 7.0 + u[5] * 23.0,
    )  # fmt: skip


def _wobbled(base: float, phases: tuple[float, ...], now: float) -> float:
    """``base`` varied by at most +-WOBBLE, smoothly in time: a slow and a fast sine wave."""
    phase, slow_period, fast_period = phases
    wave = 0.7 * math.sin(2 * math.pi * now / slow_period + phase) + 0.3 * math.sin(
        2 * math.pi * now / fast_period + 2 * phase
    )
    return max(0.0, base * (1.0 + WOBBLE * wave))
