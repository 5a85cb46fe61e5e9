"""The qemu hypervisor engine: real guests, one QEMU process per VM, driven over QMP.

:class:`QemuDriver` implements :class:`hv.driver.Driver`. Its state lives in ``state_dir``::

    qemu-driver.lock         one driver per state directory (flock)
    cache/                   qemu-info.json (QEMU's answers), accel-probe.json (the KVM verdict)
    images/                  the default image directory: kernels, initrds and disks VMs may use
    vms/NAME/                one private (0700) runtime directory per VM:
        spec.json state.json    the spec, and the last power state with QEMU's pid (and migration URIs)
        qmp.sock qemu.pid       QMP socket and QEMU's pid file
        serial.log console.log  the serial port (COM1) and the virtio console, as files
        qemu.log                QEMU's own stdout/stderr
        disk-vda.qcow2 ...      qcow2 overlays on the disks' base images

How it fits together:

- **VMs outlive the agent.** QEMU is spawned detached (:mod:`hv.qemu.process`), listening for QMP
  on a socket the driver bound in the VM's directory. :meth:`QemuDriver.close` only disconnects;
  :meth:`QemuDriver.open` finds each VM's QEMU again by its pid (checked against the process start
  time and command line, so a reused pid is not mistaken for it) and reconnects to ``qmp.sock``. A
  VM whose QEMU vanished meanwhile shows as ``crashed``, with an event.
- **Events.** A pidfd tells the moment QEMU exits. With QMP's ``SHUTDOWN`` event (and its reason)
  the exit is a guest power-off (``shutdown``), a stop from outside (``stopped``) or a crash
  (``crashed``). A guest-initiated ``RESET`` is ``rebooted``; a ``STOP``/``RESUME`` the driver did
  not ask for is ``paused``/``resumed``. Outcomes of the driver's own calls are not emitted: the
  agent reports those.
- **Safety.** QEMU runs from an argument list under ``-sandbox on``; a spec's paths must resolve
  inside the image directories, backing chains included (:mod:`hv.qemu.image_policy`).
- **Acceleration** is probed, not assumed (:mod:`hv.qemu.accel`).
- **Live migration** (:mod:`hv.qemu.migration` has the URI and the QMP mappings). The destination
  runs the same command line plus ``-incoming defer`` in state ``incoming``; the source keeps
  sending while no agent watches, and ``state.json`` keeps each side's URI so a new driver picks
  the migration up again. QEMU's own stop and restart of the guest around the switchover are not
  reported as events; after a completed migration the source idles ``paused`` ("migrated away")
  until the agent destroys it.

Calls on one VM are serialised by a per-VM lock; calls on different VMs run concurrently.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import shlex
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

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
from hv.qemu import accel as accel_mod
from hv.qemu import command_line, host, migration
from hv.qemu.errors import InvalidSpec
from hv.qemu.files import make_private_dir
from hv.qemu.image_policy import ImageLayer, ImagePolicy
from hv.qemu.process import (
    ProcessWatch,
    cmdline_of,
    describe_wait_status,
    read_proc_stat,
    spawn_detached,
    uptime_s,
)
from hv.qemu.qmp import QmpSession
from hv.storage import write_atomic
from protocols.messages import Capabilities, VmEventKind, VmPowerState, VmStatus
from protocols.migration import MigrationPolicy, MigrationSample, check_policy
from protocols.vmspec import HOST_ID_RE, DiskSpec, VmSpec, explain_validation_error

__all__ = ["BlockStats", "QemuDriver"]

log = logging.getLogger(__name__)

MIB = 1024 * 1024

T = TypeVar("T")

#: States in which a VM has a QEMU the driver re-attaches to.
_HAS_QEMU: frozenset[VmPowerState] = POWERED_ON | {"incoming"}

#: ``query-migrate`` statuses of a source whose migration is under way (QEMU's own names).
_MIGRATING = frozenset(
    {"setup", "active", "pre-switchover", "device", "wait-unplug", "postcopy-active", "postcopy-paused",
     "postcopy-recover"}
)  # fmt: skip
_POSTCOPY = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
#: How long the driver waits for QEMU to settle a cancel, a mirror's last copy or an export's removal.
_SETTLE_TIMEOUT_S = 30.0
_POLL_S = 0.01
#: How long a "completed" migration may lack its total time and downtime in ``query-migrate``.
_COMPLETED_FIGURES_S = 0.5
#: How long migrate_finish waits for a destination that is still loading the end of its stream.
_LOAD_WAIT_S = 3.0

#: QMP ``SHUTDOWN`` reasons that mean the guest itself powered off.
_GUEST_POWEROFF = frozenset({"guest-shutdown"})


class BlockStats(msgspec.Struct, frozen=True, kw_only=True):
    """I/O counters of one disk since QEMU started (from QMP ``query-blockstats``)."""

    target: str
    rd_bytes: int
    wr_bytes: int
    rd_operations: int
    wr_operations: int


class _SavedState(msgspec.Struct, frozen=True, kw_only=True):
    """A VM's ``state.json``. ``version`` changes when the layout does."""

    version: Literal[1] = 1
    state: VmPowerState
    started_at: float | None = None
    reason: str = ""
    pid: int | None = None
    #: The process's start time (clock ticks after boot): with the pid, it names one process.
    pid_start_ticks: int | None = None
    #: Source of a migration: the URI it was sent to (a re-sent migrate_send must name the same).
    migration_uri: str = ""
    #: Destination: the URI handed out while ``incoming`` (until migrate_finish or a power-off).
    incoming_uri: str = ""


class _Qemu:
    """One running QEMU process of a VM and what the driver knows about it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start_ticks: int | None = None
        self.watch: ProcessWatch | None = None
        self.qmp: QmpSession | None = None
        #: Set while starting, shutting down or destroying: an exit then is no crash.
        self.expected_exit = False
        #: Set while the driver's own ``stop``/``cont`` runs, so their events are not reported.
        self.own_stop = False
        self.own_cont = False
        self.shutdown_data: Mapping[str, Any] | None = None
        self.panicked = False
        self.io_error = ""
        self.cpu_sample: tuple[float, float] | None = None
        self.dirty_mib_s = 0.0
        self.dirty_measuring = False
        self.dirty_unsupported = False
        #: Source: a migration was started from this QEMU and has not failed or been cancelled.
        self.migrating = False
        #: Source: QEMU stopped the guest for the switchover (a STOP/RESUME that is no news).
        self.migration_stopped = False
        #: Source with storage copy: one switchover (mirrors completed, migrate-continue) at a time.
        self.switchover_lock = asyncio.Lock()
        self.switchover_done = False
        #: Source: set by each QMP ``MIGRATION`` event; :meth:`QemuDriver.migrate_wait` waits on it.
        self.migration_news = asyncio.Event()

    @property
    def exited(self) -> bool:
        return self.watch is None or self.watch.exited.is_set()


class _Vm:
    """One VM's record inside the driver."""

    def __init__(self, spec: VmSpec, vm_dir: Path, saved: _SavedState) -> None:
        self.spec = spec
        self.dir = vm_dir
        self.state: VmPowerState = saved.state
        self.started_at = saved.started_at
        self.reason = saved.reason
        self.lock = asyncio.Lock()
        self.qemu: _Qemu | None = None
        self.migration_uri = saved.migration_uri
        self.incoming_uri = saved.incoming_uri
        #: The state file as the driver found it at open (its pid is how re-attaching starts).
        self.loaded = saved

    @property
    def name(self) -> str:
        return self.spec.name

    def status(self) -> VmStatus:
        return VmStatus(
            name=self.spec.name,
            state=self.state,
            spec=self.spec,
            started_at=self.started_at,
            reason=self.reason,
        )

    def saved(self) -> _SavedState:
        qemu = self.qemu
        return _SavedState(
            state=self.state,
            started_at=self.started_at,
            reason=self.reason,
            pid=qemu.pid if qemu is not None else None,
            pid_start_ticks=qemu.start_ticks if qemu is not None else None,
            migration_uri=self.migration_uri,
            incoming_uri=self.incoming_uri,
        )


class QemuDriver(Driver):
    """Real VMs under QEMU on this host, with their state in ``state_dir``.

    Options (the CLI passes them through :func:`hv.engines.create_driver`):
        image_dirs: directories VMs may take kernels, initrds and disk images from (default
            ``state_dir/images``); every path in a spec must resolve inside one of them.
        accel: ``auto`` (probe KVM, else TCG), ``kvm`` or ``tcg``.
        qemu_binary, qemu_img: the programs (default: found on PATH).
        cache_dir: where the QEMU introspection and KVM verdict are cached (default
            ``state_dir/cache``); several drivers may share one.
        sandbox: run QEMU under ``-sandbox on`` (seccomp). Leave it on; turning it off is for QEMU
            builds without seccomp.
        kvm_probe_timeout_s, qmp_timeout_s, start_timeout_s: deadlines.
        power_idle_w, power_max_w: the host's power model, for the controller's power manager.

    Raises (constructor):
        ValueError: no state directory, an invalid host id or accel, or a non-positive deadline.
    """

    name = "qemu"

    def __init__(
        self,
        *,
        host_id: str,
        state_dir: Path | str | None,
        image_dirs: Sequence[Path | str] | None = None,
        accel: str = "auto",
        qemu_binary: str | None = None,
        qemu_img: str | None = None,
        cache_dir: Path | str | None = None,
        sandbox: bool = True,
        kvm_probe_timeout_s: float = 1.5,
        qmp_timeout_s: float = 5.0,
        start_timeout_s: float = 10.0,
        power_idle_w: float = 0.0,
        power_max_w: float = 0.0,
    ) -> None:
        super().__init__()
        if not HOST_ID_RE.fullmatch(host_id):
            raise ValueError(
                f"host id {host_id!r} is invalid: use 1-64 letters, digits, '.', '_' and '-', "
                "starting and ending with a letter or digit"
            )
        if state_dir is None:
            raise ValueError(
                f"qemu host {host_id!r}: the qemu engine needs a state directory for its VMs "
                "(pass state_dir, or --state-dir on the command line)"
            )
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"qemu host {host_id!r}: accel must be 'auto', 'kvm' or 'tcg', got {accel!r}")
        for what, value in (
            ("kvm_probe_timeout_s", kvm_probe_timeout_s),
            ("qmp_timeout_s", qmp_timeout_s),
            ("start_timeout_s", start_timeout_s),
        ):
            if value <= 0:
                raise ValueError(f"qemu host {host_id!r}: {what} must be positive, got {value}")
        self.host_id = host_id
        self.state_dir = Path(state_dir).absolute()
        self.vms_dir = self.state_dir / "vms"
        self.cache_dir = Path(cache_dir).absolute() if cache_dir is not None else self.state_dir / "cache"
        self._default_images = image_dirs is None
        dirs = [Path(d) for d in image_dirs] if image_dirs is not None else [self.state_dir / "images"]
        self.image_dirs = [d.absolute() for d in dirs]
        self.accel_mode: accel_mod.AccelMode = accel  # type: ignore[assignment]  # checked above
        self.qemu_binary = qemu_binary or shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
        self.qemu_img = qemu_img or shutil.which("qemu-img") or "/usr/bin/qemu-img"
        self.sandbox = sandbox
        self.kvm_probe_timeout_s = kvm_probe_timeout_s
        self.qmp_timeout_s = qmp_timeout_s
        self.start_timeout_s = start_timeout_s
        self.power_idle_w = float(power_idle_w)
        self.power_max_w = float(power_max_w)
        self.policy = ImagePolicy(self.image_dirs, qemu_img=self.qemu_img)
        self.accel: accel_mod.AccelChoice | None = None
        self.qemu_info: host.QemuInfo | None = None
        self._caps: Capabilities | None = None
        self._vms: dict[str, _Vm] = {}
        self._defining: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock_fd: int | None = None
        self._open = False

    # ---------------------------------------------------------------------------------------------
    # Driver lifetime
    # ---------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Take the state directory, learn what QEMU and the host offer, choose the accelerator,
        and re-attach to the VMs a previous driver left running.

        Raises:
            EngineError: another driver holds the state directory, QEMU is missing or lacks the
                sandbox, or ``accel=kvm`` without a usable ``/dev/kvm``.
        """
        if self._open:
            return
        try:
            make_private_dir(self.state_dir)
            make_private_dir(self.vms_dir)
            if self._default_images:
                self.image_dirs[0].mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise EngineError(
                f"qemu host {self.host_id!r}: cannot create the state directory {self.state_dir}: "
                f"{exc.strerror or exc}; check its permissions or pick another --state-dir"
            ) from exc
        self._take_lock()
        try:
            await self._learn_host()
            self._vms = self._load_vms()
            self._open = True
            for vm in list(self._vms.values()):
                if vm.state in _HAS_QEMU:
                    await self._reattach(vm)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Detach: stop watching QEMU and disconnect QMP. VMs keep running."""
        self._open = False
        for vm in self._vms.values():
            qemu = vm.qemu
            if qemu is None:
                continue
            if qemu.watch is not None:
                qemu.watch.detach()
            if qemu.qmp is not None:
                await qemu.qmp.close()
        # The background tasks are QMP disconnects and migration switchovers; let them finish
        # (each QMP call in them has a timeout).
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.qmp_timeout_s + 1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        self._vms = {}
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _take_lock(self) -> None:
        path = self.state_dir / "qemu-driver.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EngineError(
                f"qemu host {self.host_id!r}: another qemu driver (an agent?) is using {self.state_dir}; "
                "stop it first, or give this one its own --state-dir"
            ) from None
        self._lock_fd = fd

    async def _learn_host(self) -> None:
        make_private_dir(self.cache_dir)
        info = await host.introspect_qemu(Path(self.qemu_binary), self.cache_dir / "qemu-info.json")
        if self.sandbox and not info.sandbox:
            raise EngineError(
                f"{self.qemu_binary} was built without seccomp, so it cannot run VMs under -sandbox on; "
                "install a QEMU with seccomp support (Debian's has it), or pass sandbox=False to run "
                "VMs unconfined"
            )
        self.qemu_info = info
        self.accel = await accel_mod.choose_accel(
            self.accel_mode,
            binary=Path(self.qemu_binary),
            qemu_version=info.version,
            machine_types=info.machine_types,
            sandbox=info.sandbox and self.sandbox,
            work_dir=self.cache_dir,
            cache_file=self.cache_dir / "accel-probe.json",
            timeout_s=self.kvm_probe_timeout_s,
        )
        log.info("qemu host %s: QEMU %s, %s", self.host_id, info.version, self.accel.reason)
        cpu = host.parse_cpuinfo(_read_text("/proc/cpuinfo"))
        arch = os.uname().machine
        disk_gib = 0
        with contextlib.suppress(OSError):
            disk_gib = shutil.disk_usage(self.state_dir).free // (1024**3)
        arches = host.guest_arches(Path(self.qemu_binary).parent)
        self._caps = Capabilities(
            engine="qemu",
            engine_version=info.version,
            arch=arch,
            cpu_vendor=cpu.vendor,
            cpu_model=cpu.model,
            cpu_features=host.reported_cpu_features(cpu.flags),
            accel=self.accel.accel,
            cores=os.cpu_count() or 1,
            memory_mib=host.parse_meminfo_mib(_read_text("/proc/meminfo")),
            disk_gib=disk_gib,
            guest_arches=[a for a in arches if a in host.SUPPORTED_ARCHES],
            machine_types=builtins.list(info.machine_types),
            power_idle_w=self.power_idle_w,
            power_max_w=self.power_max_w,
        )

    async def capabilities(self) -> Capabilities:
        """The host: arch, cores, memory, CPU vendor and features, accel, QEMU version, machine types.

        Raises:
            EngineError: the driver is not open.
        """
        self._require_open()
        assert self._caps is not None
        return self._caps

    # ---------------------------------------------------------------------------------------------
    # Lifecycle
    # ---------------------------------------------------------------------------------------------

    async def define(self, spec: VmSpec) -> VmStatus:
        """Check a spec (devices, paths, backing chains) and create the VM's directory, ``defined``.

        Raises:
            VmExists: a VM of that name exists here.
            InvalidSpec: the spec is invalid, or names a file outside the image directories.
            InsufficientResources: the guest's arch is not supported here, or its memory plus that
                of the VMs defined already exceeds the host's.
            EngineError: the driver is not open, or the VM directory cannot be written.
        """
        self._require_open()
        spec = self._validated(spec)
        name = spec.name
        if name in self._vms or name in self._defining:
            state = self._vms[name].state if name in self._vms else "being defined"
            raise VmExists(
                f"vm {name!r} already exists on host {self.host_id!r} (it is {state}); "
                "pick another name, or undefine the existing VM first"
            )
        self._defining.add(name)
        try:
            self._check_resources(spec)
            await self._check_files(spec)
            vm_dir = self.vms_dir / name
            if vm_dir.exists():
                raise EngineError(
                    f"vm {name!r}: its directory {vm_dir} exists although no such VM is known (left from "
                    "a damaged VM?); move it away and define the VM again"
                )
            vm = _Vm(spec, vm_dir, _SavedState(state="defined"))
            try:
                make_private_dir(vm_dir)
                write_atomic(vm_dir / "spec.json", msgspec.json.encode(spec))
            except OSError as exc:
                shutil.rmtree(vm_dir, ignore_errors=True)
                raise EngineError(
                    f"vm {name!r}: cannot write its directory {vm_dir}: {exc.strerror or exc}; "
                    "check free space and permissions of the state directory"
                ) from exc
            self._save(vm)
            self._vms[name] = vm
            return vm.status()
        finally:
            self._defining.discard(name)

    async def start(self, name: str) -> VmStatus:
        """Power a defined, stopped or crashed VM on: launch QEMU and return once QMP says it runs.

        The guest starts executing as soon as QEMU is up; the driver's QMP handshake runs alongside.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is powered on already.
            InvalidSpec: a file of the spec has moved out of the image directories since define.
            EngineError: QEMU failed to start (the message quotes its log), or the driver is not open.
        """
        vm = self._get(name)
        async with vm.lock:
            self._require_state(vm, "start", POWERED_OFF)
            plan = await self._plan(vm)
            argv = command_line.build_argv(self.qemu_binary, plan)
            self._prepare_runtime_files(vm, argv)
            qemu = await self._launch(vm, argv)
            vm.qemu = qemu
            qemu.expected_exit = True
            try:
                qmp = await self._connect_qmp(vm, qemu, self.start_timeout_s)
                status = await qmp.execute("query-status")
            except BaseException as exc:
                # Never leave a half-started QEMU behind, cancelled or not.
                if qemu.watch is not None:
                    qemu.watch.send_signal(signal.SIGKILL)
                vm.qemu = None
                if not isinstance(exc, EngineError):
                    raise
                await self._wait_briefly(qemu)
                wait_status = qemu.watch.wait_status if qemu.watch is not None else None
                by_itself = wait_status is not None and os.WIFEXITED(wait_status)  # not by our SIGKILL
                why = f"qemu exited at once ({describe_wait_status(wait_status)})" if by_itself else str(exc)
                raise EngineError(f"vm {name!r} did not start: {why}; {self._qemu_says(vm)}") from exc
            qemu.expected_exit = False
            if qemu.exited:
                vm.qemu = None
                raise EngineError(f"vm {name!r} did not start: qemu exited right away; {self._qemu_says(vm)}")
            vm.state = "running" if _qmp_status(status) == "running" else "paused"
            vm.started_at = time.time()
            vm.reason = ""
            vm.migration_uri = ""
            self._save(vm)
            await self._set_balloon(vm, qmp)
            return vm.status()

    async def shutdown(self, name: str, timeout_s: float) -> VmStatus:
        """Press the ACPI power button; destroy the VM if the guest has not powered off after
        ``timeout_s``. A paused VM is resumed first, so its guest can react. The returned status's
        ``reason`` says whether the guest complied.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not powered on.
            EngineError: QEMU would not die even after SIGKILL, or the driver is not open.
        """
        vm = self._get(name)
        async with vm.lock:
            self._require_state(vm, "shutdown", POWERED_ON)
            qemu = vm.qemu
            assert qemu is not None
            was = vm.state
            qemu.expected_exit = True
            graceful = False
            try:
                qmp = await self._qmp(vm, qemu)
                if was == "paused":
                    await self._own_cont(qemu, qmp)
                await qmp.execute("system_powerdown")
                vm.state = "stopping"
                graceful = qemu.watch is not None and await qemu.watch.wait(max(0.0, timeout_s))
                reason = ""
                if not graceful:
                    await self._terminate(vm, qemu)
                    reason = f"the guest did not power off within {timeout_s:g}s of the ACPI power button; destroyed"
            except EngineError as exc:
                log.warning("vm %s: graceful shutdown failed (%s); destroying it", name, exc)
                await self._guarded_terminate(vm, qemu, was)
                reason = f"graceful shutdown failed ({exc}); destroyed"
            except BaseException:
                self._abandon_stop(vm, qemu, was)
                raise
            self._powered_off(vm, "stopped", reason)
            return vm.status()

    async def destroy(self, name: str) -> VmStatus:
        """Power a VM off at once (QMP ``quit``, then SIGTERM, then SIGKILL). A VM that is off is
        left as it is; a crashed one becomes ``stopped``.

        Raises:
            UnknownVm: no VM of that name.
            EngineError: QEMU would not die even after SIGKILL, or the driver is not open.
        """
        vm = self._get(name)
        async with vm.lock:
            if vm.state in ("defined", "stopped"):
                return vm.status()
            if vm.qemu is not None:
                await self._guarded_terminate(vm, vm.qemu, vm.state)
            self._powered_off(vm, "stopped", "")
            return vm.status()

    async def pause(self, name: str) -> VmStatus:
        """Stop the vCPUs (QMP ``stop``); memory and devices stay as they are.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running.
            EngineError: QEMU refused or did not answer, or the driver is not open.
        """
        vm = self._get(name)
        async with vm.lock:
            self._require_state(vm, "pause", frozenset({"running"}))
            qemu = vm.qemu
            assert qemu is not None
            qmp = await self._qmp(vm, qemu)
            qemu.own_stop = True
            try:
                await qmp.execute("stop")
            finally:
                qemu.own_stop = False
            self._require_alive(vm, qemu, "pause")
            vm.state = "paused"
            vm.reason = ""
            self._save(vm)
            return vm.status()

    async def resume(self, name: str) -> VmStatus:
        """Restart the vCPUs of a paused VM (QMP ``cont``).

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not paused, or it migrated away (its guest runs elsewhere now).
            EngineError: QEMU refused or did not answer, or the driver is not open.
        """
        vm = self._get(name)
        async with vm.lock:
            self._require_state(vm, "resume", frozenset({"paused"}))
            qemu = vm.qemu
            assert qemu is not None
            qmp = await self._qmp(vm, qemu)
            if _qmp_status(await qmp.execute("query-status")) == "postmigrate":
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} migrated away: its guest runs on "
                    f"{vm.migration_uri or 'another host'}, and resuming this stale copy would run it twice; "
                    "destroy and undefine it here"
                )
            await self._own_cont(qemu, qmp)
            self._require_alive(vm, qemu, "resume")
            vm.state = "running"
            vm.reason = ""
            self._save(vm)
            return vm.status()

    async def reboot(self, name: str) -> VmStatus:
        """Reset the guest (QMP ``system_reset``), like pressing the reset button.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running.
            EngineError: QEMU refused or did not answer, or the driver is not open.
        """
        vm = self._get(name)
        async with vm.lock:
            self._require_state(vm, "reboot", frozenset({"running"}))
            qemu = vm.qemu
            assert qemu is not None
            await (await self._qmp(vm, qemu)).execute("system_reset")
            self._require_alive(vm, qemu, "reboot")
            vm.started_at = time.time()
            self._save(vm)
            return vm.status()

    async def undefine(self, name: str) -> None:
        """Forget a powered-off VM and delete its directory (overlays and logs included).

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is powered on.
            EngineError: the directory cannot be removed, or the driver is not open.
        """
        vm = self._get(name)
        async with vm.lock:
            self._require_state(vm, "undefine", POWERED_OFF)
            try:
                await asyncio.to_thread(shutil.rmtree, vm.dir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise EngineError(
                    f"vm {name!r}: cannot remove its directory {vm.dir}: {exc.strerror or exc}; "
                    "check its permissions"
                ) from exc
            self._vms.pop(name, None)

    async def list(self) -> builtins.list[VmStatus]:
        """Every VM on this host, sorted by name.

        Raises:
            EngineError: the driver is not open.
        """
        self._require_open()
        return [self._vms[name].status() for name in sorted(self._vms)]

    async def stats(self) -> builtins.list[VmStats]:
        """A sample of every running or paused VM, sorted by name.

        CPU use is QEMU's CPU time (``/proc/PID/stat``) since the previous sample, as a fraction of
        the VM's vCPUs; memory is what the balloon reports; the dirty rate comes from QMP
        ``calc-dirty-rate`` (page sampling, a 1 s measurement started at each sample and read at
        the next; 0.0 while paused or where QEMU cannot measure it). A VM whose QEMU does not
        answer is left out of this sample rather than failing it.

        Raises:
            EngineError: the driver is not open.
        """
        self._require_open()
        vms = [self._vms[name] for name in sorted(self._vms)]
        samples = await asyncio.gather(*(self._sample(vm) for vm in vms if vm.state in ("running", "paused")))
        return [s for s in samples if s is not None]

    # ---------------------------------------------------------------------------------------------
    # Live migration (hv.qemu.migration has the URI format and the QMP mappings)
    # ---------------------------------------------------------------------------------------------

    async def migrate_incoming(
        self, spec: VmSpec, listen_host: str, *, policy: MigrationPolicy | None = None
    ) -> tuple[VmStatus, str]:
        """Destination: define ``spec`` and launch its QEMU waiting for the stream (``-incoming
        defer``, then ``migrate-incoming`` on a free port of ``listen_host``), in state ``incoming``.

        Disks with a local overlay get a fresh overlay on the same base image here, exported
        writable over NBD (on another free port) for the source's block mirror; such a copy starts
        paused (``-S``) and runs only at :meth:`migrate_finish`, after the exports are gone. A copy
        without local disks starts the guest by itself the moment the stream ends (the shortest
        downtime) and reports ``running`` from then on. Returns the status and the URI for the
        source (format in :mod:`hv.qemu.migration`); a VM already incoming returns the same URI.
        ``policy`` (None: unknown) decides what must be on at both ends: multifd, post-copy.

        Raises:
            VmExists: a VM of that name exists here and is not incoming.
            InvalidRequest: a file of the spec (a base image, the kernel) is missing here or outside
                the image directories; ``listen_host`` is not an address of this host; the policy
                is invalid, or does not copy the local disks the spec has.
            InsufficientResources: the guest's arch or memory does not fit this host.
            EngineError: QEMU failed to start or refused the migration setup; nothing is left behind.
        """
        self._require_open()
        name = spec.name
        existing = self._vms.get(name)
        if existing is not None:
            async with existing.lock:  # a call still launching it finishes first
                if existing.state == "incoming" and existing.incoming_uri:
                    return existing.status(), existing.incoming_uri
                state = existing.state
            raise VmExists(
                f"vm {name!r} already exists on host {self.host_id!r} (it is {state}), so a migration "
                "cannot land here; migrate to another host, or destroy and undefine the VM here first"
            )
        if policy is not None and (problems := check_policy(policy)):
            raise InvalidRequest(f"vm {name!r}: migration policy rejected: " + "; ".join(problems))
        copied = migration.copied_disks(spec)
        if copied and policy is not None and not policy.copy_storage:
            raise InvalidRequest(_local_disks_message(name, copied))
        try:
            await self.define(spec)
        except InvalidSpec as exc:
            raise InvalidSpec(
                f"{exc} (host {self.host_id!r} cannot receive the migration: a migrated VM needs its "
                "kernel, initrd and disk base images at the same paths on both hosts)"
            ) from None
        vm = self._vms[name]
        try:
            async with vm.lock:
                uri = await self._launch_incoming(vm, listen_host, policy, copied)
        except BaseException:
            # Bad input or a failed launch changes nothing: the VM is forgotten again.
            await asyncio.shield(self._forget(vm))
            raise
        return vm.status(), uri

    async def migrate_send(self, name: str, uri: str, policy: MigrationPolicy) -> None:
        """Source: apply ``policy`` and start sending the VM to ``uri`` (from migrate_incoming).

        Every migration capability is set explicitly (auto-converge, xbzrle, multifd, post-copy,
        events), and the parameters: the bandwidth always, the downtime limit, the xbzrle cache and
        multifd channels. With ``policy.copy_storage`` each local overlay is first mirrored to the
        destination's NBD export (``blockdev-mirror sync=top``), and this call blocks until every
        mirror is ready, however long the copy takes (it fails when no disk byte moves for
        ``policy.no_progress_s``). Then QMP ``migrate``; this returns once QEMU has taken it (at most
        about a second later: a destination that is not listening fails here). A VM whose migration is
        under way or completed is left alone (a restarted agent re-sending attaches).

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running, is the destination of a migration, or is migrating to
                another URI.
            InvalidRequest: the policy or the URI is invalid; the VM has local disks and the policy
                does not copy storage, or the URI names no NBD server for them.
            EngineError: QEMU refused, the mirror failed, or the migration failed at once; the VM
                keeps running here.
        """
        vm = self._get(name)
        async with vm.lock:
            qemu = vm.qemu
            if vm.state == "incoming":
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} is incoming (the destination of a migration); "
                    "migrate_send needs it running; finish that migration first (migrate_finish)"
                )
            if qemu is None:
                self._require_state(vm, "migrate_send", frozenset({"running"}))
            assert qemu is not None
            qmp = await self._qmp(vm, qemu)
            status = await self._outgoing_status(vm, qmp)
            if status in _MIGRATING or status == "completed":
                if vm.migration_uri != uri:
                    raise InvalidState(
                        f"vm {name!r} on host {self.host_id!r} is already migrating to {vm.migration_uri} "
                        f"(qemu: {status}), not to {uri}; cancel it first (migrate_cancel), or pass the "
                        "same URI to follow it"
                    )
                qemu.migrating = status != "completed"
                return
            if status == "cancelling":
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r}: its previous migration is still being "
                    "cancelled; retry in a moment"
                )
            self._require_state(vm, "migrate_send", frozenset({"running"}))
            if problems := check_policy(policy):
                raise InvalidRequest(f"vm {name!r}: migration policy rejected: " + "; ".join(problems))
            target = migration.parse_uri(name, uri)
            copied = migration.copied_disks(vm.spec)
            if copied and not policy.copy_storage:
                raise InvalidRequest(_local_disks_message(name, copied))
            if copied and not target.has_nbd:
                raise InvalidRequest(
                    f"vm {name!r}: its local disks are to be copied (copy_storage), but {uri!r} names no "
                    "NBD server of the destination; pass the URI that migrate_incoming returned for this "
                    "VM's spec (it exports the disks when the spec has overlay disks)"
                )
            copy = bool(copied)
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": migration.source_capabilities(policy, copy_storage=copy)},
            )
            await qmp.execute("migrate-set-parameters", migration.source_parameters(policy))
            qemu.switchover_done = False
            if copy:
                await self._mirror_disks(vm, qmp, target, copied, policy)
            vm.migration_uri = uri
            self._save(vm)
            qemu.migrating = True
            try:
                await qmp.execute("migrate", {"uri": target.qemu_uri})
                await self._check_started(vm, qemu, qmp, uri)
            except BaseException:
                qemu.migrating = False
                if copy and not qemu.exited:
                    with contextlib.suppress(EngineError):
                        await self._drop_mirrors(vm, qmp)
                raise

    async def migrate_wait(self, name: str, timeout_s: float) -> None:
        """Source: return on QEMU's next ``MIGRATION`` event (one since the previous call counts), or
        after ``timeout_s``.

        Raises:
            UnknownVm: no VM of that name.
        """
        qemu = self._get(name).qemu
        if qemu is None or qemu.exited:
            await asyncio.sleep(timeout_s)
            return
        try:
            await asyncio.wait_for(qemu.migration_news.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            qemu.migration_news.clear()

    async def migrate_sample(self, name: str) -> MigrationSample:
        """Source: the migration now (QMP ``query-migrate``); status ``none`` when none was started.

        QEMU's inner steps fold into the engines' statuses (``pre-switchover`` and ``device`` are
        ``active``). When storage is copied and QEMU waits before the switchover, the sample first
        completes the mirrors and lets QEMU go on (a background task does the same on QEMU's event).
        Once it is ``completed``, the VM is ``paused`` here ("migrated away"). A source whose QEMU
        died reports ``failed``.

        Raises:
            UnknownVm: no VM of that name.
            EngineError: QEMU does not answer.
        """
        vm = self._get(name)
        qemu = vm.qemu
        if not vm.migration_uri:
            # No outgoing migration was started here. QEMU may still say "completed": that is the
            # incoming migration that brought this VM here.
            return MigrationSample(status="none")
        if qemu is None or qemu.exited:
            return MigrationSample(status="failed", error=f"the source's qemu is gone: {vm.reason}")
        qmp = await self._qmp(vm, qemu)
        info = await qmp.execute("query-migrate")
        if isinstance(info, dict) and info.get("status") == "pre-switchover":
            try:
                await self._switchover(vm, qemu)
            except EngineError as exc:
                log.warning("vm %s: the switchover of its migration failed: %s", name, exc)
            info = await qmp.execute("query-migrate")
        # QEMU announces "completed" a moment before it has computed the total time and downtime;
        # a sample taken on that event asks again until they are there (a few milliseconds).
        settle = time.monotonic() + _COMPLETED_FIGURES_S
        while (
            isinstance(info, dict)
            and info.get("status") == "completed"
            and not info.get("total-time")
            and time.monotonic() < settle
        ):
            await asyncio.sleep(0.002)
            info = await qmp.execute("query-migrate")
        sample = migration.sample_from_query(info if isinstance(info, dict) else {})
        if sample.status == "completed" and vm.migration_uri and not vm.incoming_uri:
            self._migrated_away(vm, qemu)
        elif sample.status in ("failed", "cancelled"):
            qemu.migrating = False
        return sample

    async def migrate_tune(self, name: str, *, downtime_ms: int) -> None:
        """Source: change the allowed downtime of the running pre-copy (``downtime-limit``).

        Raises:
            UnknownVm: no VM of that name.
            InvalidRequest: ``downtime_ms`` is below 1.
            InvalidState: no pre-copy migration is under way.
            EngineError: QEMU refused or does not answer.
        """
        vm = self._get(name)
        if downtime_ms < 1:
            raise InvalidRequest(f"vm {name!r}: downtime_ms must be at least 1, got {downtime_ms}")
        _, qmp, status = await self._source_migration(vm, "migrate_tune")
        if status not in _MIGRATING or status in _POSTCOPY:
            raise InvalidState(
                f"vm {name!r} on host {self.host_id!r} has no pre-copy migration under way (qemu: "
                f"{status}); migrate_tune changes a running one, so start it with migrate_send first"
            )
        await qmp.execute("migrate-set-parameters", {"downtime-limit": downtime_ms})

    async def migrate_postcopy(self, name: str) -> None:
        """Source: switch the running migration to post-copy (``migrate-start-postcopy``); from here
        it cannot be rolled back. A migration in post-copy already is left as it is.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: no migration is under way, or its policy did not allow post-copy.
            EngineError: QEMU refused or does not answer.
        """
        vm = self._get(name)
        _, qmp, status = await self._source_migration(vm, "migrate_postcopy")
        if status in _POSTCOPY:
            return
        if status not in _MIGRATING:
            raise InvalidState(
                f"vm {name!r} on host {self.host_id!r} has no migration under way (qemu: {status}); "
                "start one with migrate_send first"
            )
        caps = await qmp.execute("query-migrate-capabilities")
        allowed = any(
            isinstance(c, dict) and c.get("capability") == "postcopy-ram" and c.get("state") is True
            for c in (caps if isinstance(caps, builtins.list) else [])
        )
        if not allowed:
            raise InvalidState(
                f"vm {name!r} on host {self.host_id!r}: its migration's policy does not allow post-copy "
                "(postcopy=False), and QEMU cannot switch without it; let it converge, or cancel it and "
                "send it again with postcopy allowed"
            )
        await qmp.execute("migrate-start-postcopy")

    async def migrate_cancel(self, name: str) -> VmStatus:
        """Source: cancel a pre-copy migration (QMP ``migrate_cancel``, then wait until QEMU says
        cancelled or failed), drop the storage mirrors, and make sure the guest runs here: QEMU
        resumes a guest it stopped for the switchover, and the driver sends ``cont`` if it does not
        within a moment. Also the rollback after a migration that failed on its own (the destination
        died, say); a VM with no migration is just made to run.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the migration completed or is in post-copy (the guest runs on the
                destination); the VM is powered off or is the destination of a migration.
            EngineError: QEMU did not settle the cancel in time or does not answer.
        """
        vm = self._get(name)
        async with vm.lock:
            qemu, qmp, status = await self._source_migration(vm, "migrate_cancel")
            if status in _MIGRATING - _POSTCOPY or status == "cancelling":
                with contextlib.suppress(EngineError):  # it may have ended on its own meanwhile
                    await qmp.execute("migrate_cancel")
                status = await self._wait_migration_ended(vm, qmp)
            if status == "completed":
                self._migrated_away(vm, qemu)
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} has already migrated to "
                    f"{vm.migration_uri or 'its destination'}: the guest runs there, so it is too late to "
                    "cancel; destroy and undefine this copy"
                )
            if status in _POSTCOPY:
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} is in post-copy: the guest runs on the "
                    "destination and this host no longer holds all of its memory, so it cannot be rolled "
                    "back; wait until the migration completes"
                )
            qemu.migrating = False
            await self._drop_mirrors(vm, qmp)
            await self._ensure_running(vm, qemu, qmp)
            vm.state = "running"
            vm.reason = ""
            self._save(vm)
            return vm.status()

    async def migrate_finish(self, name: str) -> VmStatus:
        """Destination: the stream has completed; stop the NBD exports (when disks were copied) and
        ``cont`` a copy that waits paused. The VM is an ordinary running VM from then on; one that
        runs already is returned as it is.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the copy is still receiving (QEMU ``inmigrate``), or its QEMU died.
            EngineError: QEMU refused, reports the guest unusable, or does not answer.
        """
        vm = self._get(name)
        async with vm.lock:
            qemu = vm.qemu
            if qemu is None or qemu.exited:
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} is {vm.state} ({vm.reason or 'no reason known'}); "
                    "there is no received copy to finish; destroy and undefine it here, the guest stays on "
                    "its source"
                )
            if vm.state == "running" and not vm.incoming_uri:
                return vm.status()
            if vm.state != "incoming" and not vm.incoming_uri:
                self._require_state(vm, "migrate_finish", frozenset({"running"}))
            qmp = await self._qmp(vm, qemu)
            status = await self._received(qmp)
            if status == "inmigrate":
                raise InvalidState(
                    f"vm {name!r} on host {self.host_id!r} is still receiving its migration (qemu: "
                    "inmigrate); call migrate_finish once the source reports the migration completed"
                )
            if vm.incoming_uri and migration.parse_uri(name, vm.incoming_uri).has_nbd:
                await self._stop_exports(vm, qmp)
            if status != "running":
                if status not in ("paused", "postmigrate", "prelaunch"):
                    raise EngineError(
                        f"vm {name!r}: qemu reports the received guest as {status}, so it cannot run; "
                        "destroy and undefine this copy, and cancel the migration on the source"
                    )
                await self._own_cont(qemu, qmp)
            self._require_alive(vm, qemu, "migrate_finish")
            vm.state = "running"
            vm.reason = ""
            vm.incoming_uri = ""
            self._save(vm)
            return vm.status()

    # -- migration helpers --------------------------------------------------------------------------

    async def _received(self, qmp: QmpSession) -> str:
        """The destination's run state, once the stream it is reading has been loaded.

        The source reports ``completed`` when it has sent the last byte; the destination may still
        be loading the device state for a moment. While its stream is ``active`` that moment is
        waited out (at most :data:`_LOAD_WAIT_S`); a copy whose stream has not even begun is not.
        """
        deadline = time.monotonic() + _LOAD_WAIT_S
        while True:
            status = _qmp_status(await qmp.execute("query-status"))
            if status != "inmigrate" or time.monotonic() > deadline:
                return status
            if _migration_status(await qmp.execute("query-migrate")) not in ("active", "completed"):
                return status
            await asyncio.sleep(_POLL_S)

    async def _launch_incoming(
        self,
        vm: _Vm,
        listen_host: str,
        policy: MigrationPolicy | None,
        copied: Sequence[DiskSpec],
    ) -> str:
        """Launch the waiting copy; returns its URI. The caller forgets the VM if this raises."""
        plan = dataclasses.replace(await self._plan(vm), incoming=True, start_paused=bool(copied))
        argv = command_line.build_argv(self.qemu_binary, plan)
        self._prepare_runtime_files(vm, argv)
        qemu = await self._launch(vm, argv)
        vm.qemu = qemu
        qemu.expected_exit = True  # until it waits, a failure is this call's to report
        try:
            qmp = await self._connect_qmp(vm, qemu, self.start_timeout_s)
            await self._incoming_capabilities(vm, qmp, policy)
            nbd_port = await self._export_disks(vm, qmp, listen_host, copied) if copied else None
            port = await self._listen_incoming(vm, qmp, listen_host)
        except EngineError as exc:
            raise EngineError(
                f"vm {vm.name!r} cannot wait for its migration on host {self.host_id!r}: {exc}; "
                f"{self._qemu_says(vm)}"
            ) from exc
        qemu.expected_exit = False
        if qemu.exited:
            raise EngineError(
                f"vm {vm.name!r} cannot wait for its migration: qemu exited right away; {self._qemu_says(vm)}"
            )
        uri = migration.format_uri(listen_host, port, listen_host if nbd_port else None, nbd_port)
        vm.state = "incoming"
        vm.started_at = time.time()
        vm.reason = f"waiting for the migration stream on {uri}"
        vm.incoming_uri = uri
        vm.migration_uri = ""
        self._save(vm)
        return uri

    async def _incoming_capabilities(self, vm: _Vm, qmp: QmpSession, policy: MigrationPolicy | None) -> None:
        """Multifd and post-copy must be on at both ends before ``migrate-incoming``."""
        postcopy = policy is None or policy.postcopy
        try:
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": migration.destination_capabilities(policy, postcopy=postcopy)},
            )
        except EngineError as exc:
            if not postcopy or policy is not None:
                raise
            # The policy is unknown, so post-copy was only a maybe: a host without userfaultfd
            # still takes pre-copy.
            log.info("vm %s: this host cannot receive post-copy (%s); pre-copy only", vm.name, exc)
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": migration.destination_capabilities(policy, postcopy=False)},
            )
        if policy is not None and policy.multifd:
            await qmp.execute("migrate-set-parameters", {"multifd-channels": policy.multifd_channels})

    async def _export_disks(
        self, vm: _Vm, qmp: QmpSession, listen_host: str, copied: Sequence[DiskSpec]
    ) -> int:
        """Start the NBD server on a free port; export each copied disk's fresh overlay, writable."""
        port = await self._on_free_port(
            vm,
            listen_host,
            lambda p: qmp.execute(
                "nbd-server-start", {"addr": {"type": "inet", "data": {"host": listen_host, "port": str(p)}}}
            ),
        )
        for disk in copied:
            await qmp.execute(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": migration.JOB_PREFIX + disk.target,
                    "node-name": command_line.top_node_name(disk.target),
                    "name": disk.target,
                    "writable": True,
                },
            )
        return port

    async def _listen_incoming(self, vm: _Vm, qmp: QmpSession, listen_host: str) -> int:
        return await self._on_free_port(
            vm,
            listen_host,
            lambda p: qmp.execute("migrate-incoming", {"uri": migration.format_uri(listen_host, p)}),
        )

    async def _on_free_port(self, vm: _Vm, host_addr: str, listen: Callable[[int], Awaitable[object]]) -> int:
        """Run ``listen`` on a port that was free a moment ago; another pick if it was taken since."""
        for attempt in range(3):
            try:
                port = migration.free_port(host_addr)
            except OSError as exc:
                raise InvalidRequest(
                    f"vm {vm.name!r}: cannot listen for the migration on {host_addr!r}: "
                    f"{exc.strerror or exc}; give an address of host {self.host_id!r}"
                ) from exc
            try:
                await listen(port)
            except EngineError as exc:
                if attempt == 2 or "in use" not in str(exc).lower():
                    raise
                continue
            return port
        raise AssertionError("unreachable")

    async def _stop_exports(self, vm: _Vm, qmp: QmpSession) -> None:
        """Destination: remove the NBD exports and stop the server, before the guest may write."""
        ours = await self._exports(qmp)
        for export in ours:
            with contextlib.suppress(EngineError):  # already going away
                await qmp.execute("block-export-del", {"id": export, "mode": "hard"})
        await self._poll(vm, lambda: self._exports(qmp), lambda left: not left, "its NBD exports to close")
        with contextlib.suppress(EngineError):  # not running (a re-sent migrate_finish)
            await qmp.execute("nbd-server-stop")

    async def _exports(self, qmp: QmpSession) -> builtins.list[str]:
        result = await qmp.execute("query-block-exports")
        return [
            str(e["id"])
            for e in (result if isinstance(result, builtins.list) else [])
            if isinstance(e, dict) and str(e.get("id", "")).startswith(migration.JOB_PREFIX)
        ]

    async def _mirror_disks(
        self,
        vm: _Vm,
        qmp: QmpSession,
        target: migration.MigrationUri,
        copied: Sequence[DiskSpec],
        policy: MigrationPolicy,
    ) -> None:
        """Mirror each local overlay to the destination's export and wait until all are ready.

        A mirror still running from an earlier call (an agent restarted meanwhile) is kept; the
        remains of one that ended are removed first.
        """
        jobs = {j["id"]: j for j in await self._mirror_jobs(qmp)}
        if any(j.get("status") == "concluded" for j in jobs.values()):
            await self._drop_mirrors(vm, qmp)
            jobs = {}
        nodes = await self._nbd_nodes(qmp)
        try:
            for disk in copied:
                job, node = migration.JOB_PREFIX + disk.target, migration.NBD_NODE_PREFIX + disk.target
                if job in jobs:
                    continue
                if node not in nodes:
                    await qmp.execute(
                        "blockdev-add",
                        {
                            "driver": "nbd",
                            "node-name": node,
                            "server": {"type": "inet", "host": target.nbd_host, "port": str(target.nbd_port)},
                            "export": disk.target,
                        },
                    )
                await qmp.execute(
                    "blockdev-mirror",
                    {
                        "job-id": job,
                        "device": command_line.top_node_name(disk.target),
                        "target": node,
                        "sync": "top",
                        "auto-dismiss": False,
                    },
                )
            await self._wait_mirrors_ready(vm, qmp, [migration.JOB_PREFIX + d.target for d in copied], policy)
        except BaseException:
            with contextlib.suppress(EngineError):
                await asyncio.shield(self._drop_mirrors(vm, qmp))
            raise

    async def _wait_mirrors_ready(
        self, vm: _Vm, qmp: QmpSession, ids: Sequence[str], policy: MigrationPolicy
    ) -> None:
        moved_at, copied_so_far = time.monotonic(), -1
        while True:
            jobs = {j["id"]: j for j in await self._mirror_jobs(qmp)}
            for job_id in ids:
                job = jobs.get(job_id)
                if job is None or job.get("status") == "concluded":
                    why = (job or {}).get("error") or "the job ended early"
                    raise EngineError(
                        f"vm {vm.name!r}: copying disk {job_id.removeprefix(migration.JOB_PREFIX)} to the "
                        f"destination failed: {why}; the migration did not start and the VM runs here; "
                        "check the destination (is it still waiting?) and migrate again"
                    )
            if all(jobs[j].get("status") == "ready" for j in ids):
                return
            progress = sum(int(jobs[j].get("current-progress", 0)) for j in ids)
            now = time.monotonic()
            if progress != copied_so_far:
                moved_at, copied_so_far = now, progress
            elif now - moved_at >= policy.no_progress_s:
                raise EngineError(
                    f"vm {vm.name!r}: no disk data moved to the destination for {policy.no_progress_s:g}s "
                    "while copying its disks; the link or the destination is down; the migration did not "
                    "start and the VM runs here"
                )
            await asyncio.sleep(0.1)

    async def _mirror_jobs(self, qmp: QmpSession) -> builtins.list[dict[str, Any]]:
        result = await qmp.execute("query-jobs")
        return [
            j
            for j in (result if isinstance(result, builtins.list) else [])
            if isinstance(j, dict) and str(j.get("id", "")).startswith(migration.JOB_PREFIX)
        ]

    async def _nbd_nodes(self, qmp: QmpSession) -> set[str]:
        result = await qmp.execute("query-named-block-nodes", {"flat": True})
        return {
            str(n.get("node-name"))
            for n in (result if isinstance(result, builtins.list) else [])
            if isinstance(n, dict) and str(n.get("node-name", "")).startswith(migration.NBD_NODE_PREFIX)
        }

    async def _drop_mirrors(self, vm: _Vm, qmp: QmpSession) -> None:
        """Cancel the storage mirrors at once and remove them and their NBD connections."""
        for job in await self._mirror_jobs(qmp):
            if job.get("status") != "concluded":
                with contextlib.suppress(EngineError):  # it concluded meanwhile
                    await qmp.execute("block-job-cancel", {"device": job["id"], "force": True})
        jobs = await self._poll(
            vm,
            lambda: self._mirror_jobs(qmp),
            lambda js: all(j.get("status") == "concluded" for j in js),
            "its storage mirrors to stop",
        )
        await self._remove_mirrors(qmp, jobs)

    async def _remove_mirrors(self, qmp: QmpSession, jobs: Sequence[Mapping[str, Any]]) -> None:
        for job in jobs:
            with contextlib.suppress(EngineError):
                await qmp.execute("job-dismiss", {"id": job["id"]})
        for node in await self._nbd_nodes(qmp):
            with contextlib.suppress(EngineError):
                await qmp.execute("blockdev-del", {"node-name": node})

    async def _switchover(self, vm: _Vm, qemu: _Qemu) -> None:
        """Source copying storage: QEMU stopped the guest and waits (``pre-switchover``). Complete
        each ready mirror (a soft cancel copies what is left, then ends without error), then let QEMU
        send the device state. A mirror that failed cancels the migration instead: the destination
        would miss writes, and QEMU resumes the guest here."""
        async with qemu.switchover_lock:
            if qemu.switchover_done or vm.qemu is not qemu or qemu.exited:
                return
            qmp = await self._qmp(vm, qemu)
            if _migration_status(await qmp.execute("query-migrate")) != "pre-switchover":
                return
            for job in await self._mirror_jobs(qmp):
                if job.get("status") != "concluded":
                    await qmp.execute("block-job-cancel", {"device": job["id"]})
            jobs = await self._poll(
                vm,
                lambda: self._mirror_jobs(qmp),
                lambda js: all(j.get("status") == "concluded" for j in js),
                "its storage mirrors to copy their last writes",
            )
            failed = [
                f"{j['id'].removeprefix(migration.JOB_PREFIX)}: {j['error']}" for j in jobs if j.get("error")
            ]
            await self._remove_mirrors(qmp, jobs)
            if failed:
                log.error(
                    "vm %s: a storage mirror failed at the switchover (%s); cancelling the migration, the "
                    "guest resumes here",
                    vm.name,
                    "; ".join(failed),
                )
                await qmp.execute("migrate_cancel")
            else:
                await qmp.execute("migrate-continue", {"state": "pre-switchover"})
            qemu.switchover_done = True

    async def _switchover_logged(self, vm: _Vm, qemu: _Qemu) -> None:
        try:
            await self._switchover(vm, qemu)
        except EngineError as exc:
            # migrate_sample tries again; the agent's guard aborts a migration that stays stuck.
            log.warning("vm %s: the switchover of its migration failed: %s", vm.name, exc)

    async def _check_started(self, vm: _Vm, qemu: _Qemu, qmp: QmpSession, uri: str) -> None:
        """Wait a moment for QEMU to connect: a destination that is not listening fails here."""
        deadline = time.monotonic() + 1.0
        while True:
            info = await qmp.execute("query-migrate")
            status = _migration_status(info)
            if status == "failed":
                error = info.get("error-desc", "no reason given") if isinstance(info, dict) else ""
                raise EngineError(
                    f"vm {vm.name!r}: the migration to {uri} failed at once: {error}; is the destination "
                    "waiting for it (migrate_incoming) and reachable from this host? The VM runs here"
                )
            if status != "setup" or time.monotonic() > deadline:
                return
            await asyncio.sleep(_POLL_S)

    async def _wait_migration_ended(self, vm: _Vm, qmp: QmpSession) -> str:
        info = await self._poll(
            vm,
            lambda: qmp.execute("query-migrate"),
            lambda i: _migration_status(i) not in (_MIGRATING - _POSTCOPY) | {"cancelling"},
            "its migration to end after migrate_cancel",
        )
        return _migration_status(info)

    async def _ensure_running(self, vm: _Vm, qemu: _Qemu, qmp: QmpSession) -> None:
        """After a cancelled or failed migration: QEMU resumes a guest it stopped for the switchover
        by itself (a moment later); a guest still stopped after that gets a ``cont``."""
        # Only a guest the migration stopped gets that moment: a cont racing QEMU's own restart would
        # show as a pause and a resume from outside.
        deadline = time.monotonic() + (2.0 if qemu.migration_stopped else 0.0)
        while True:
            status = _qmp_status(await qmp.execute("query-status"))
            if status == "running":
                break
            if status not in ("finish-migrate", "inmigrate") and time.monotonic() > deadline:
                await self._own_cont(qemu, qmp)
                break
            if time.monotonic() > deadline + _SETTLE_TIMEOUT_S:
                raise EngineError(
                    f"vm {vm.name!r}: qemu stays {status} after the migration ended; destroy and start the VM"
                )
            await asyncio.sleep(_POLL_S)
        qemu.migration_stopped = False
        self._require_alive(vm, qemu, "migrate_cancel")

    async def _source_migration(self, vm: _Vm, operation: str) -> tuple[_Qemu, QmpSession, str]:
        """The QEMU of a migration's source, its QMP session and QEMU's migration status."""
        if vm.state == "incoming":
            raise InvalidState(
                f"vm {vm.name!r} on host {self.host_id!r} is incoming (the destination of a migration); "
                f"{operation} acts on the source; roll a destination back with destroy and undefine"
            )
        qemu = vm.qemu
        if qemu is None:
            self._require_state(vm, operation, frozenset({"running", "paused"}))
        assert qemu is not None
        qmp = await self._qmp(vm, qemu)
        return qemu, qmp, await self._outgoing_status(vm, qmp)

    async def _outgoing_status(self, vm: _Vm, qmp: QmpSession) -> str:
        """QEMU's status of the migration this VM sends; ``none`` when it sent none.

        Until a QEMU sends, ``query-migrate`` reports how it *arrived*: a copy that came by migration
        says ``completed`` for good. Only :meth:`migrate_send` sets ``migration_uri``, so without one
        there is nothing outgoing to speak of.
        """
        if not vm.migration_uri:
            return "none"
        return _migration_status(await qmp.execute("query-migrate"))

    async def _poll(
        self,
        vm: _Vm,
        get: Callable[[], Awaitable[T]],
        done: Callable[[T], bool],
        what: str,
    ) -> T:
        """``get()`` every 50 ms until ``done`` says so.

        Raises:
            EngineError: not within 30 s.
        """
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        while True:
            value = await get()
            if done(value):
                return value
            if time.monotonic() > deadline:
                raise EngineError(
                    f"vm {vm.name!r}: waited {_SETTLE_TIMEOUT_S:g}s for {what} in vain; qemu may be hung; "
                    "destroy the VM if this persists"
                )
            await asyncio.sleep(_POLL_S)

    async def _forget(self, vm: _Vm) -> None:
        """Undo a migrate_incoming that failed: kill its QEMU, remove its directory and record."""
        qemu = vm.qemu
        if qemu is not None:
            qemu.expected_exit = True
            if qemu.watch is not None:
                qemu.watch.send_signal(signal.SIGKILL)
                await qemu.watch.wait(5.0)
            if qemu.qmp is not None:
                await qemu.qmp.close()
            vm.qemu = None
        await asyncio.to_thread(shutil.rmtree, vm.dir, True)
        self._vms.pop(vm.name, None)

    # ---------------------------------------------------------------------------------------------
    # Extras of this engine (not part of Driver)
    # ---------------------------------------------------------------------------------------------

    def vm_dir(self, name: str) -> Path:
        """The VM's runtime directory.

        Raises:
            UnknownVm: no VM of that name.
        """
        return self._get(name).dir

    def serial_log_path(self, name: str) -> Path:
        """Where the VM's serial port (COM1, ``ttyS0``) is logged; it starts empty at each start.

        Raises:
            UnknownVm: no VM of that name.
        """
        return self._get(name).dir / command_line.SERIAL_LOG

    def console_log_path(self, name: str) -> Path:
        """Where the VM's virtio console (``hvc0``) is logged.

        Raises:
            UnknownVm: no VM of that name.
        """
        return self._get(name).dir / command_line.CONSOLE_LOG

    def qemu_pid(self, name: str) -> int | None:
        """The pid of the VM's QEMU, or None when it is powered off.

        Raises:
            UnknownVm: no VM of that name.
        """
        qemu = self._get(name).qemu
        return qemu.pid if qemu is not None else None

    async def block_stats(self, name: str) -> builtins.list[BlockStats]:
        """I/O counters of the VM's disks (QMP ``query-blockstats``), by disk target.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not powered on.
            EngineError: QEMU did not answer.
        """
        vm = self._get(name)
        self._require_state(vm, "block_stats", frozenset({"running", "paused"}))
        qemu = vm.qemu
        assert qemu is not None
        result = await (await self._qmp(vm, qemu)).execute("query-blockstats")
        out = []
        for entry in result if isinstance(result, builtins.list) else []:
            # "disk-vda", or "/machine/peripheral/disk-vda/virtio-backend", depending on the device.
            qdev = str(entry.get("qdev", ""))
            ids = [part for part in qdev.split("/") if part.startswith("disk-")]
            target = ids[0].removeprefix("disk-") if ids else qdev
            st = entry.get("stats", {})
            out.append(
                BlockStats(
                    target=target,
                    rd_bytes=int(st.get("rd_bytes", 0)),
                    wr_bytes=int(st.get("wr_bytes", 0)),
                    rd_operations=int(st.get("rd_operations", 0)),
                    wr_operations=int(st.get("wr_operations", 0)),
                )
            )
        return sorted(out, key=lambda b: b.target)

    # ---------------------------------------------------------------------------------------------
    # Checks
    # ---------------------------------------------------------------------------------------------

    def _validated(self, spec: VmSpec) -> VmSpec:
        """The spec, re-checked against its field constraints (a Struct built in code skips them)."""
        try:
            spec = msgspec.convert(msgspec.to_builtins(spec), VmSpec)
        except msgspec.ValidationError as exc:
            raise InvalidSpec(f"vm spec rejected: {explain_validation_error(exc)}") from None
        assert self.qemu_info is not None
        problems = command_line.spec_problems(
            spec, machine_types=self.qemu_info.machine_types, cpu_models=self.qemu_info.cpu_models
        )
        if problems:
            raise InvalidSpec(f"vm {spec.name!r}: " + "; ".join(problems))
        return spec

    def _check_resources(self, spec: VmSpec) -> None:
        assert self._caps is not None
        caps = self._caps
        if spec.arch not in caps.guest_arches:
            raise InsufficientResources(
                f"vm {spec.name!r} is {spec.arch} but host {self.host_id!r} runs only "
                f"{', '.join(caps.guest_arches) or 'no'} guests under QEMU; place it on a {spec.arch} host"
            )
        committed = sum(vm.spec.memory_mib for vm in self._vms.values())
        free = caps.memory_mib - committed
        if spec.memory_mib > free:
            raise InsufficientResources(
                f"vm {spec.name!r} needs {spec.memory_mib} MiB of memory but host {self.host_id!r} has "
                f"{free} MiB free ({committed} of {caps.memory_mib} MiB held by {len(self._vms)} defined "
                "VMs); undefine VMs that are not needed or place it on another host"
            )

    async def _check_files(self, spec: VmSpec) -> None:
        """Confine the kernel, initrd and every disk's backing chain to the image directories."""
        if spec.boot.kernel is not None:
            self.policy.confine(spec.name, "boot.kernel", spec.boot.kernel)
        if spec.boot.initrd is not None:
            self.policy.confine(spec.name, "boot.initrd", spec.boot.initrd)
        for disk in spec.disks:
            await self.policy.disk_chain(spec.name, f"disk {disk.target} source", disk.source, disk.format)

    async def _plan(self, vm: _Vm) -> command_line.LaunchPlan:
        """Check the files again (they may have changed since define) and create missing overlays."""
        spec = vm.spec
        kernel = initrd = None
        if spec.boot.kernel is not None:
            kernel = self.policy.confine(spec.name, "boot.kernel", spec.boot.kernel)
        if spec.boot.initrd is not None:
            initrd = self.policy.confine(spec.name, "boot.initrd", spec.boot.initrd)
        disks = []
        for disk in spec.disks:
            chain = await self.policy.disk_chain(
                spec.name, f"disk {disk.target} source", disk.source, disk.format
            )
            layers: tuple[ImageLayer, ...] = tuple(chain)
            if disk.overlay and not disk.readonly:
                overlay = vm.dir / f"disk-{disk.target}.qcow2"
                if not overlay.exists():
                    await self.policy.create_overlay(spec.name, overlay, chain[0], chain[0].virtual_size)
                layers = (
                    ImageLayer(path=overlay, format="qcow2", virtual_size=chain[0].virtual_size),
                    *chain,
                )
            disks.append(command_line.DiskPlan(spec=disk, layers=layers))
        assert self.accel is not None
        return command_line.LaunchPlan(
            spec=spec,
            accel=self.accel.accel,
            vm_dir=vm.dir,
            kernel=kernel,
            initrd=initrd,
            disks=tuple(disks),
            sandbox=self.sandbox,
            ram_pad_kib=command_line.TCG_RAM_PAD_KIB if self.accel.accel == "tcg" else 0,
        )

    # ---------------------------------------------------------------------------------------------
    # Processes and QMP
    # ---------------------------------------------------------------------------------------------

    def _prepare_runtime_files(self, vm: _Vm, argv: Sequence[str]) -> None:
        """Keep the previous boot's serial log as ``serial.log.1``; note the command in qemu.log."""
        try:
            for name in (command_line.SERIAL_LOG, command_line.CONSOLE_LOG):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(vm.dir / name, vm.dir / f"{name}.1")
            with (vm.dir / command_line.QEMU_LOG).open("a") as qemu_log:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                qemu_log.write(f"{stamp} {_START_MARK} {shlex.join(argv)}\n")
        except OSError as exc:
            raise EngineError(
                f"vm {vm.name!r}: cannot prepare its log files in {vm.dir}: {exc.strerror or exc}; "
                "check free space and permissions of the state directory"
            ) from exc

    async def _launch(self, vm: _Vm, argv: Sequence[str]) -> _Qemu:
        """Bind the QMP socket, spawn QEMU detached with it, and start watching the process."""
        try:
            listener = _bind_unix(vm.dir, command_line.QMP_SOCKET)
        except OSError as exc:
            raise EngineError(
                f"vm {vm.name!r}: cannot create its QMP socket in {vm.dir}: {exc.strerror or exc}"
            ) from exc
        try:
            pid = spawn_detached(
                argv, log_path=vm.dir / command_line.QEMU_LOG, qmp_socket_fd=listener.fileno()
            )
        except OSError as exc:
            raise EngineError(
                f"vm {vm.name!r}: cannot run {argv[0]}: {exc.strerror or exc}; "
                "install QEMU (apt-get install -y qemu-system-x86) or fix qemu_binary"
            ) from exc
        finally:
            listener.close()  # QEMU has its own copy now
        qemu = _Qemu(pid)
        qemu.watch = ProcessWatch(pid, functools.partial(self._on_exit, vm, qemu))
        stat = read_proc_stat(pid)
        qemu.start_ticks = stat.start_ticks if stat is not None else None
        return qemu

    async def _connect_qmp(self, vm: _Vm, qemu: _Qemu, timeout_s: float) -> QmpSession:
        session = QmpSession(
            vm.name, functools.partial(self._on_qmp_event, vm, qemu), timeout_s=self.qmp_timeout_s
        )
        try:
            sock = _connect_unix(vm.dir, command_line.QMP_SOCKET)
        except OSError as exc:
            raise EngineError(
                f"vm {vm.name!r}: cannot reach qemu's monitor at {vm.dir / command_line.QMP_SOCKET}: "
                f"{exc.strerror or exc}"
            ) from exc
        try:
            await session.connect(sock, timeout_s)  # on success the session owns the socket
        except BaseException:
            sock.close()
            raise
        qemu.qmp = session
        return session

    async def _qmp(self, vm: _Vm, qemu: _Qemu) -> QmpSession:
        """The VM's QMP session, reconnected if it was lost while QEMU still runs.

        Raises:
            EngineError: QEMU has exited or its monitor does not answer.
        """
        if qemu.qmp is not None and qemu.qmp.connected:
            return qemu.qmp
        if qemu.exited:
            raise EngineError(f"vm {vm.name!r}: qemu (pid {qemu.pid}) has exited")
        return await self._connect_qmp(vm, qemu, self.qmp_timeout_s)

    async def _own_cont(self, qemu: _Qemu, qmp: QmpSession) -> None:
        qemu.own_cont = True
        try:
            await qmp.execute("cont")
        finally:
            qemu.own_cont = False

    async def _terminate(self, vm: _Vm, qemu: _Qemu) -> None:
        """Make QEMU exit: QMP ``quit``, then SIGTERM, then SIGKILL, each with a deadline.

        Raises:
            EngineError: it still runs after SIGKILL.
        """
        qemu.expected_exit = True
        watch = qemu.watch
        if watch is None or watch.exited.is_set():
            return
        if qemu.qmp is not None and qemu.qmp.connected:
            with contextlib.suppress(EngineError):
                await qemu.qmp.execute("quit", timeout_s=2.0)
            if await watch.wait(3.0):
                return
        for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            watch.send_signal(sig)
            if await watch.wait(wait_s):
                return
        raise EngineError(
            f"vm {vm.name!r}: qemu (pid {qemu.pid}) is still there after SIGKILL; it is probably stuck "
            "in the kernel (state D); check the host's storage"
        )

    async def _guarded_terminate(self, vm: _Vm, qemu: _Qemu, was: VmPowerState) -> None:
        """:meth:`_terminate`, but a failure or cancellation leaves the VM's record true."""
        try:
            await self._terminate(vm, qemu)
        except BaseException:
            self._abandon_stop(vm, qemu, was)
            raise

    def _abandon_stop(self, vm: _Vm, qemu: _Qemu, was: VmPowerState) -> None:
        """A shutdown or destroy ended early (cancelled, or QEMU would not die): from now on an exit
        of this QEMU is news again, and one that happened meanwhile is recorded."""
        qemu.expected_exit = False
        if vm.qemu is not qemu:
            return
        if qemu.exited:
            self._powered_off(
                vm, "stopped", "stopped while the request to stop it was abandoned", save_errors="log"
            )
        elif vm.state == "stopping":
            vm.state = was

    async def _set_balloon(self, vm: _Vm, qmp: QmpSession) -> None:
        """Ask the balloon for ``current_memory_mib``. Best effort: the VM runs either way."""
        target = vm.spec.current_memory_mib
        if not vm.spec.balloon or target is None or target >= vm.spec.memory_mib:
            return
        try:
            await qmp.execute("balloon", {"value": target * MIB})
        except EngineError as exc:
            log.warning("vm %s: could not set the balloon to %d MiB: %s", vm.name, target, exc)

    async def _wait_briefly(self, qemu: _Qemu) -> None:
        if qemu.watch is not None:
            await qemu.watch.wait(2.0)

    def _on_exit(self, vm: _Vm, qemu: _Qemu, wait_status: int | None) -> None:
        """QEMU ended (pidfd). Unless a call of ours expected it, say why: shutdown, stop or crash."""
        if qemu.qmp is not None:
            self._spawn(qemu.qmp.close(), f"qmp-close-{vm.name}")
        if vm.qemu is not qemu or qemu.expected_exit or not self._open:
            return
        data = qemu.shutdown_data or {}
        why = str(data.get("reason", ""))
        event: VmEventKind
        state: Literal["stopped", "crashed"]
        if qemu.panicked:
            event, state, reason = "crashed", "crashed", "the guest kernel panicked"
        elif vm.state == "incoming" and wait_status is not None and os.WIFEXITED(wait_status):
            # QEMU ends an incoming migration that failed (or that the source cancelled) by exiting.
            event, state = "stopped", "stopped"
            reason = (
                f"the incoming migration ended without a guest: qemu exited ({describe_wait_status(wait_status)}), "
                "as it does when the stream fails or the source cancels; destroy and undefine this copy"
            )
        elif vm.state == "incoming":
            event, state = "crashed", "crashed"
            reason = (
                f"qemu (pid {qemu.pid}) died while receiving the migration: {describe_wait_status(wait_status)}; "
                "destroy and undefine this copy (the source still runs the guest)"
            )
        elif why in _GUEST_POWEROFF:
            event, state, reason = "shutdown", "stopped", "the guest powered itself off"
        elif data:
            event, state, reason = "stopped", "stopped", f"qemu shut down from outside fleetvisor ({why})"
        else:
            event, state = "crashed", "crashed"
            reason = f"qemu (pid {qemu.pid}) exited unexpectedly: {describe_wait_status(wait_status)}"
        log.warning("vm %s: %s", vm.name, reason)
        self._powered_off(vm, state, reason, save_errors="log")
        self.emit(DriverEvent(vm=vm.name, event=event, state=state, reason=reason))

    def _on_qmp_event(self, vm: _Vm, qemu: _Qemu, name: str, data: Mapping[str, Any]) -> None:
        """An asynchronous QMP event. Runs in the QMP reader: it must not await QMP."""
        if vm.qemu is not qemu:
            return
        if name == "SHUTDOWN":
            qemu.shutdown_data = dict(data)
        elif name == "GUEST_PANICKED":
            qemu.panicked = True
        elif name == "BLOCK_IO_ERROR":
            qemu.io_error = (
                f"disk {data.get('device') or data.get('node-name', '?')}: {data.get('reason', '')}"
            )
        elif name == "RESET" and data.get("guest") is True and not qemu.expected_exit:
            vm.started_at = time.time()
            self._save(vm, errors="log")
            self.emit(
                DriverEvent(vm=vm.name, event="rebooted", state=vm.state, reason="the guest rebooted itself")
            )
        elif name == "MIGRATION":
            qemu.migration_news.set()
            self._on_migration_event(vm, qemu, str(data.get("status", "")))
        elif name == "STOP" and qemu.migrating and vm.state == "running":
            # QEMU stops the source for the switchover (or post-copy): that is the migration working.
            qemu.migration_stopped = True
            vm.state = "paused"
            vm.reason = "stopped for the switchover to the destination"
            self._save(vm, errors="log")
        elif name == "RESUME" and vm.state == "incoming":
            # The stream completed (or post-copy began) and QEMU started the guest here on its own.
            vm.state = "running"
            vm.reason = ""
            self._save(vm, errors="log")
        elif name == "RESUME" and qemu.migration_stopped and vm.state == "paused":
            # The migration failed or was cancelled after the guest was stopped; QEMU resumed it here.
            qemu.migration_stopped = False
            vm.state = "running"
            vm.reason = ""
            self._save(vm, errors="log")
        elif name == "STOP" and not (qemu.own_stop or qemu.expected_exit) and vm.state == "running":
            vm.state = "paused"
            vm.reason = (
                f"qemu paused the guest after an I/O error ({qemu.io_error})"
                if qemu.io_error
                else "paused outside fleetvisor"
            )
            self._save(vm, errors="log")
            self.emit(DriverEvent(vm=vm.name, event="paused", state="paused", reason=vm.reason))
        elif name == "RESUME" and not (qemu.own_cont or qemu.expected_exit) and vm.state == "paused":
            vm.state = "running"
            vm.reason = "resumed outside fleetvisor"
            self._save(vm, errors="log")
            self.emit(DriverEvent(vm=vm.name, event="resumed", state="running", reason=vm.reason))

    def _on_migration_event(self, vm: _Vm, qemu: _Qemu, status: str) -> None:
        """QMP ``MIGRATION`` (the ``events`` capability is on at both ends). Runs in the QMP reader."""
        if not vm.migration_uri or vm.incoming_uri:
            return  # a destination (only migrate_send sets migration_uri): its RESUME or exit tells
        if status == "pre-switchover":
            self._spawn(self._switchover_logged(vm, qemu), f"switchover-{vm.name}")
        elif status == "completed":
            self._migrated_away(vm, qemu)
        elif status in _POSTCOPY:
            qemu.migration_stopped = False  # no way back: the guest runs on the destination now
            if vm.state == "running":
                vm.state = "paused"
            vm.reason = f"post-copy to {vm.migration_uri or 'the destination'}: the guest runs there now"
            self._save(vm, errors="log")
        elif status in ("failed", "cancelled"):
            qemu.migrating = False

    def _migrated_away(self, vm: _Vm, qemu: _Qemu) -> None:
        """The source after a completed migration: QEMU idles in ``postmigrate``; the VM is paused."""
        qemu.migrating = qemu.migration_stopped = False
        reason = (
            f"migrated away to {vm.migration_uri or 'another host'}: the guest runs there now; "
            "destroy and undefine this copy"
        )
        if vm.state == "paused" and vm.reason == reason:
            return
        vm.state = "paused"
        vm.reason = reason
        self._save(vm, errors="log")

    async def _reattach(self, vm: _Vm) -> None:
        """Find a VM's QEMU from an earlier driver again, or record that it is gone."""
        saved = vm.loaded
        pid = _read_pid(vm.dir / command_line.PID_FILE) or saved.pid
        stat = read_proc_stat(pid) if pid else None
        alive = (
            pid is not None
            and stat is not None
            and stat.state != "Z"
            and (saved.pid_start_ticks is None or saved.pid_start_ticks == stat.start_ticks)
            and _is_qemu_of(pid, vm.dir)
        )
        qemu = _Qemu(pid) if alive and pid is not None else None
        if qemu is not None:
            qemu.start_ticks = stat.start_ticks if stat is not None else None
            try:
                qemu.watch = ProcessWatch(qemu.pid, functools.partial(self._on_exit, vm, qemu))
            except ProcessLookupError:  # it ended just now
                qemu = None
        if qemu is None:
            if pid is not None and stat is not None and stat.state == "Z":
                _reap(pid)  # our own child, left by a driver in this process
            reason = f"qemu (pid {pid or '?'}) exited while no agent was attached; its exit status is unknown"
            log.warning("vm %s: %s", vm.name, reason)
            self._powered_off(vm, "crashed", reason, save_errors="log")
            self.emit(DriverEvent(vm=vm.name, event="crashed", state="crashed", reason=reason))
            return
        vm.qemu = qemu
        try:
            qmp = await self._connect_qmp(vm, qemu, self.qmp_timeout_s)
            status = _qmp_status(await qmp.execute("query-status"))
        except EngineError as exc:
            vm.reason = f"qemu runs but its monitor did not answer: {exc}"
            log.warning("vm %s: %s", vm.name, vm.reason)
            return
        if qemu.exited:
            return  # _on_exit has recorded why
        if vm.state == "incoming" and status != "running":
            pass  # still receiving, or received and waiting for migrate_finish (-S)
        else:
            vm.state = "running" if status == "running" else "paused"
            if status not in ("running", "paused"):
                vm.reason = f"qemu reports the guest as {status}"
        if vm.state != "incoming" and vm.migration_uri:
            await self._reattach_migration(vm, qemu, qmp)
        self._save(vm, errors="log")
        log.info("vm %s: re-attached to qemu pid %d (%s)", vm.name, qemu.pid, vm.state)

    async def _reattach_migration(self, vm: _Vm, qemu: _Qemu, qmp: QmpSession) -> None:
        """A source re-attached while (or after) migrating: pick the migration up where QEMU is."""
        try:
            info = await qmp.execute("query-migrate")
        except EngineError as exc:
            log.warning("vm %s: cannot see its migration after re-attaching: %s", vm.name, exc)
            return
        status = str(info.get("status", "none")) if isinstance(info, dict) else "none"
        if status in _MIGRATING:
            qemu.migrating = True
            qemu.migration_stopped = vm.state == "paused" and status not in _POSTCOPY
            if vm.state == "paused":
                vm.reason = "stopped for the switchover to the destination"
            if status == "pre-switchover":
                self._spawn(self._switchover_logged(vm, qemu), f"switchover-{vm.name}")
            if status in _POSTCOPY:
                vm.reason = f"post-copy to {vm.migration_uri}: the guest runs there now"
        elif status == "completed":
            self._migrated_away(vm, qemu)

    async def _sample(self, vm: _Vm) -> VmStats | None:
        qemu = vm.qemu
        if qemu is None or qemu.exited:
            return None
        state = vm.state
        memory_mib = vm.spec.memory_mib
        dirty = 0.0
        try:
            qmp = await self._qmp(vm, qemu)
            state = "running" if _qmp_status(await qmp.execute("query-status")) == "running" else "paused"
            if vm.spec.balloon:
                balloon = await qmp.execute("query-balloon")
                if isinstance(balloon, dict) and "actual" in balloon:
                    memory_mib = int(balloon["actual"]) // MIB
            if state == "running":
                dirty = await self._dirty_rate(vm, qemu, qmp)
        except EngineError as exc:
            log.debug("vm %s: left out of this stats sample: %s", vm.name, exc)
            return None
        return VmStats(
            name=vm.name,
            state=state,
            cpu_util=self._cpu_util(vm, qemu),
            dirty_mib_s=dirty,
            memory_mib=memory_mib,
        )

    def _cpu_util(self, vm: _Vm, qemu: _Qemu) -> float:
        """QEMU's CPU time since the last sample (since it started, at first) over the VM's vCPUs."""
        stat = read_proc_stat(qemu.pid)
        if stat is None:
            return 0.0
        now = time.monotonic()
        previous = qemu.cpu_sample
        qemu.cpu_sample = (now, stat.cpu_s)
        if previous is None:
            elapsed, used = uptime_s() - stat.start_s, stat.cpu_s
        else:
            elapsed, used = now - previous[0], stat.cpu_s - previous[1]
        if elapsed <= 0:
            return 0.0
        return max(0.0, min(1.0, used / elapsed / vm.spec.vcpus))

    async def _dirty_rate(self, vm: _Vm, qemu: _Qemu, qmp: QmpSession) -> float:
        """The latest dirty-page rate from ``calc-dirty-rate`` (MiB/s); starts the next measurement.

        While the VM migrates away, the migration's own measurement is used instead: a
        ``calc-dirty-rate`` hashing pages next to the migration stream slowed QEMU's migration by a
        third here (bench/migrate).
        """
        if qemu.migrating:
            info = await qmp.execute("query-migrate")
            if isinstance(info, dict):
                rate = migration.sample_from_query(info).dirty_rate_bytes_s / MIB
                if rate > 0:
                    qemu.dirty_mib_s = rate
            return qemu.dirty_mib_s
        if qemu.dirty_unsupported:
            return 0.0
        try:
            if qemu.dirty_measuring:
                info = await qmp.execute("query-dirty-rate")
                status = info.get("status") if isinstance(info, dict) else None
                if status == "measuring":
                    return qemu.dirty_mib_s
                if isinstance(info, dict) and status == "measured":
                    qemu.dirty_mib_s = float(info.get("dirty-rate", 0))
                qemu.dirty_measuring = False
            await qmp.execute("calc-dirty-rate", {"calc-time": 1})
            qemu.dirty_measuring = True
        except EngineError as exc:
            if qemu.exited:
                raise
            # Cheap where it works; where it does not, report 0.0 rather than fail telemetry.
            qemu.dirty_unsupported = True
            log.info("vm %s: qemu cannot measure the dirty-page rate (%s); reporting 0", vm.name, exc)
        return qemu.dirty_mib_s

    # ---------------------------------------------------------------------------------------------
    # State and persistence
    # ---------------------------------------------------------------------------------------------

    def _powered_off(
        self,
        vm: _Vm,
        state: Literal["stopped", "crashed"],
        reason: str,
        *,
        save_errors: Literal["raise", "log"] = "raise",
    ) -> None:
        qemu = vm.qemu
        if qemu is not None and qemu.qmp is not None:
            self._spawn(qemu.qmp.close(), f"qmp-close-{vm.name}")
        vm.qemu = None
        vm.state = state
        vm.started_at = None
        vm.reason = reason
        vm.incoming_uri = ""
        self._save(vm, errors=save_errors)

    def _save(self, vm: _Vm, *, errors: Literal["raise", "log"] = "raise") -> None:
        try:
            write_atomic(vm.dir / "state.json", msgspec.json.encode(vm.saved()))
        except OSError as exc:
            message = (
                f"vm {vm.name!r}: cannot save its state in {vm.dir}: {exc.strerror or exc}; "
                "check free space and permissions of the state directory"
            )
            if errors == "log":
                log.error("%s", message)
                return
            raise EngineError(message) from exc

    def _read_saved(self, vm_dir: Path) -> _SavedState | None:
        try:
            return msgspec.json.decode((vm_dir / "state.json").read_bytes(), type=_SavedState)
        except (OSError, msgspec.DecodeError):
            return None

    def _load_vms(self) -> dict[str, _Vm]:
        vms: dict[str, _Vm] = {}
        try:
            entries = sorted(self.vms_dir.iterdir())
        except OSError as exc:
            raise EngineError(
                f"qemu host {self.host_id!r}: cannot list {self.vms_dir}: {exc.strerror or exc}"
            ) from exc
        for vm_dir in entries:
            if not vm_dir.is_dir():
                continue
            try:
                spec = msgspec.json.decode((vm_dir / "spec.json").read_bytes(), type=VmSpec)
            except (OSError, msgspec.DecodeError) as exc:
                log.error(
                    "qemu host %s: skipping %s: its spec.json cannot be read (%s); restore it, or move the "
                    "directory away",
                    self.host_id,
                    vm_dir,
                    exc,
                )
                continue
            if spec.name != vm_dir.name:
                log.error(
                    "qemu host %s: skipping %s: it holds the spec of vm %r", self.host_id, vm_dir, spec.name
                )
                continue
            saved = self._read_saved(vm_dir) or _SavedState(state="stopped", reason="state.json was missing")
            vms[spec.name] = _Vm(spec, vm_dir, saved)
        return vms

    # ---------------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "qemu host %s: task %s failed", self.host_id, task.get_name(), exc_info=task.exception()
            )

    def _require_open(self) -> None:
        if not self._open:
            raise not_open("qemu", self.host_id)

    def _get(self, name: str) -> _Vm:
        self._require_open()
        vm = self._vms.get(name)
        if vm is None:
            raise unknown_vm(self.host_id, name, self._vms)
        return vm

    def _require_state(self, vm: _Vm, operation: str, allowed: Iterable[VmPowerState]) -> None:
        require_state(vm.name, self.host_id, vm.state, operation, allowed)

    def _require_alive(self, vm: _Vm, qemu: _Qemu, operation: str) -> None:
        if vm.qemu is not qemu:
            raise EngineError(
                f"vm {vm.name!r}: qemu exited during {operation} ({vm.reason or 'no reason known'})"
            )

    def _qemu_says(self, vm: _Vm, lines: int = 4) -> str:
        """QEMU's own messages since the last start, for an error a person reads."""
        path = vm.dir / command_line.QEMU_LOG
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        since_start = text.rsplit(_START_MARK, 1)[-1].splitlines()[1:] if _START_MARK in text else []
        said = [_without_timestamp(line) for line in since_start if line.strip()][-lines:]
        if not said:
            return f"qemu printed nothing; check the host, then the full log {path}"
        return f"qemu said: {' / '.join(said)}; fix the VM's spec or the host accordingly (full log: {path})"


# -------------------------------------------------------------------------------------------------
# Module helpers
# -------------------------------------------------------------------------------------------------


#: How the driver marks each start in qemu.log (error messages quote what QEMU printed after it).
_START_MARK = "fleetvisor: starting"


def _without_timestamp(line: str) -> str:
    """A qemu.log line without the ``-msg timestamp=on`` prefix and the program name."""
    stamp, sep, rest = line.partition(" ")
    if sep and stamp[:4].isdigit() and "T" in stamp:
        line = rest
    program, sep, message = line.partition(": ")
    return message if sep and os.path.basename(program).startswith("qemu") else line


def _migration_status(result: object) -> str:
    """QEMU's own ``query-migrate`` status (``none`` before any migration)."""
    if isinstance(result, dict):
        return str(result.get("status", "none"))
    return "none"


def _local_disks_message(name: str, disks: Sequence[DiskSpec]) -> str:
    listed = ", ".join(f"{d.target} (an overlay on {d.source})" for d in disks)
    return (
        f"vm {name!r} has local disks the destination does not have: {listed}; migrate with "
        "copy_storage=True to copy them with a block mirror, or keep such VMs on shared storage "
        "(disks with overlay=False, at the same path on both hosts)"
    )


def _qmp_status(result: object) -> str:
    if isinstance(result, dict):
        return str(result.get("status", "unknown"))
    return "unknown"


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise EngineError(f"cannot read {path}: {exc.strerror or exc}; is /proc mounted?") from exc


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_qemu_of(pid: int, vm_dir: Path) -> bool:
    """Whether process ``pid`` is a QEMU whose pid file is in ``vm_dir`` (not a process that reused
    the pid)."""
    argv = cmdline_of(pid)
    if not argv or "qemu" not in Path(argv[0]).name or "-pidfile" not in argv[:-1]:
        return False
    # The same file, however the state directory was spelt (relative, through a symlink).
    try:
        return os.path.samefile(argv[argv.index("-pidfile") + 1], vm_dir / command_line.PID_FILE)
    except OSError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _dir_path(vm_dir: Path, name: str) -> tuple[int, str]:
    """A short path to ``vm_dir/name`` through /proc/self/fd: unix socket paths are limited to 108
    bytes, state directories are not. The caller closes the returned descriptor."""
    fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return fd, f"/proc/self/fd/{fd}/{name}"


def _bind_unix(vm_dir: Path, name: str) -> socket.socket:
    fd, path = _dir_path(vm_dir, name)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(8)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)


def _connect_unix(vm_dir: Path, name: str) -> socket.socket:
    fd, path = _dir_path(vm_dir, name)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)  # a full backlog must not block the event loop
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)
