"""The qemu hypervisor engine: real guests, one QEMU process per VM, driven over QMP.

:class:`QemuDriver` implements :class:`hv.driver.Driver` as a facade: it owns the state directory
and its lock, learns the host at open, and hands each call to one part. Its state lives in
``state_dir``::

    qemu-driver.lock         one driver per state directory (flock)
    cache/                   qemu-info.json (QEMU's answers), accel-probe.json (the KVM verdict)
    images/                  the default image directory: kernels, initrds and disks VMs may use
    vms/NAME/                one private (0700) runtime directory per VM:
        spec.json state.json    the spec, and the last power state with QEMU's pid (and migration URIs)
        qmp.sock qemu.pid       QMP socket and QEMU's pid file
        serial.log console.log  the serial port (COM1) and the virtio console, as files
        qemu.log                QEMU's own stdout/stderr
        disk-vda.qcow2 ...      qcow2 overlays on the disks' base images

The parts, each in its own module, get their collaborators as constructor arguments:

- :mod:`hv.qemu.host_facts`: what the host and QEMU offer, and the accelerator (probed, not
  assumed: :mod:`hv.qemu.accel`).
- :mod:`hv.qemu.launch`: spec checks, file confinement (:mod:`hv.qemu.image_policy`) and the launch
  plan (:mod:`hv.qemu.command_line`). QEMU runs from an argument list under ``-sandbox on``.
- :mod:`hv.qemu.instance`: one QEMU process (spawned detached by :mod:`hv.qemu.process`) and its
  QMP session (:mod:`hv.qemu.qmp`).
- :mod:`hv.qemu.vm_table`: the VM records and their ``state.json``; :mod:`hv.qemu.lifecycle`: define
  to undefine; :mod:`hv.qemu.vm_events`: QEMU's exits and QMP events, through the pure transitions
  of :mod:`hv.qemu.phase`; :mod:`hv.qemu.reattach`: VMs outlive the agent, and a new driver finds
  their QEMU again; :mod:`hv.qemu.telemetry`: samples and disk counters.
- :mod:`hv.qemu.migration_source`, :mod:`hv.qemu.migration_destination` and
  :mod:`hv.qemu.storage_copy`: live migration (:mod:`hv.qemu.migration` has the URI and QMP's
  answers).

Calls on one VM are serialised by a per-VM lock; calls on different VMs run concurrently.
Imports: :mod:`hv.driver`, the parts above, and :mod:`protocols`; no part imports this module.
"""

from __future__ import annotations

import builtins
import fcntl
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from hv.driver import POWERED_ON, Driver, EngineError, VmStats
from hv.qemu import accel as accel_mod
from hv.qemu import command_line, host
from hv.qemu.files import make_private_dir
from hv.qemu.host_facts import HostFacts, HostSettings, learn_host
from hv.qemu.image_policy import ImagePolicy
from hv.qemu.launch import Launcher
from hv.qemu.lifecycle import Lifecycle
from hv.qemu.migration_destination import MigrationDestination
from hv.qemu.migration_source import MigrationSource
from hv.qemu.reattach import Reattacher
from hv.qemu.tasks import BackgroundTasks
from hv.qemu.telemetry import BlockStats, Telemetry
from hv.qemu.vm_events import VmEvents
from hv.qemu.vm_table import VmTable
from protocols.messages import Capabilities, VmPowerState, VmStatus
from protocols.migration import MigrationPolicy, MigrationSample
from protocols.vmspec import HOST_ID_RE, VmSpec

__all__ = ["BlockStats", "QemuDriver"]

#: States in which a VM has a QEMU the driver re-attaches to.
_HAS_QEMU: frozenset[VmPowerState] = POWERED_ON | {"incoming"}


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
        _check_options(host_id, state_dir, accel, kvm_probe_timeout_s, qmp_timeout_s, start_timeout_s)
        assert state_dir is not None
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
        self._facts: HostFacts | None = None
        self._lock_fd: int | None = None
        self._build_parts()

    def _build_parts(self) -> None:
        self._tasks = BackgroundTasks(self.host_id)
        self._table = VmTable(self.host_id, self.vms_dir, self._tasks)
        self._launcher = Launcher(host_id=self.host_id, policy=self.policy, sandbox=self.sandbox)
        self._source = MigrationSource(self._table)
        self._events = VmEvents(
            table=self._table,
            tasks=self._tasks,
            emit=self.emit,
            switchover=self._source.switchover_logged,
            qmp_timeout_s=self.qmp_timeout_s,
        )
        self._lifecycle = Lifecycle(
            table=self._table,
            launcher=self._launcher,
            events=self._events,
            qemu_binary=self.qemu_binary,
            start_timeout_s=self.start_timeout_s,
        )
        self._destination = MigrationDestination(
            table=self._table,
            lifecycle=self._lifecycle,
            launcher=self._launcher,
            start_timeout_s=self.start_timeout_s,
        )
        self._reattacher = Reattacher(table=self._table, events=self._events)
        self._telemetry = Telemetry(self._table)

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
        if self._table.opened:
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
            self._table.load()
            self._table.opened = True
            for vm in builtins.list(self._table.vms.values()):
                if vm.state in _HAS_QEMU:
                    await self._reattacher.reattach(vm)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Detach: stop watching QEMU and disconnect QMP. VMs keep running."""
        self._table.opened = False
        for vm in self._table.vms.values():
            qemu = vm.qemu
            if qemu is None:
                continue
            if qemu.watch is not None:
                qemu.watch.detach()
            if qemu.qmp is not None:
                await qemu.qmp.close()
        # The background tasks are QMP disconnects and migration switchovers; let them finish
        # (each QMP call in them has a timeout).
        await self._tasks.drain(self.qmp_timeout_s + 1.0)
        self._table.vms = {}
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
        facts = await learn_host(
            HostSettings(
                host_id=self.host_id,
                state_dir=self.state_dir,
                cache_dir=self.cache_dir,
                qemu_binary=self.qemu_binary,
                accel_mode=self.accel_mode,
                sandbox=self.sandbox,
                kvm_probe_timeout_s=self.kvm_probe_timeout_s,
                power_idle_w=self.power_idle_w,
                power_max_w=self.power_max_w,
            )
        )
        self._facts = facts
        self._launcher.facts = facts
        self.qemu_info = facts.info
        self.accel = facts.accel

    async def capabilities(self) -> Capabilities:
        """The host: arch, cores, memory, CPU vendor and features, accel, QEMU version, machine types.

        Raises:
            EngineError: the driver is not open.
        """
        self._table.require_open()
        assert self._facts is not None
        return self._facts.caps

    # ---------------------------------------------------------------------------------------------
    # Lifecycle (hv.qemu.lifecycle)
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
        return await self._lifecycle.define(spec)

    async def start(self, name: str) -> VmStatus:
        """Power a defined, stopped or crashed VM on: launch QEMU and return once QMP says it runs.

        The guest starts executing as soon as QEMU is up; the driver's QMP handshake runs alongside.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is powered on already.
            InvalidSpec: a file of the spec has moved out of the image directories since define.
            EngineError: QEMU failed to start (the message quotes its log), or the driver is not open.
        """
        return await self._lifecycle.start(name)

    async def shutdown(self, name: str, timeout_s: float) -> VmStatus:
        """Press the ACPI power button; destroy the VM if the guest has not powered off after
        ``timeout_s``. A paused VM is resumed first, so its guest can react. The returned status's
        ``reason`` says whether the guest complied.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not powered on.
            EngineError: QEMU would not die even after SIGKILL, or the driver is not open.
        """
        return await self._lifecycle.shutdown(name, timeout_s)

    async def destroy(self, name: str) -> VmStatus:
        """Power a VM off at once (QMP ``quit``, then SIGTERM, then SIGKILL). A VM that is off is
        left as it is; a crashed one becomes ``stopped``.

        Raises:
            UnknownVm: no VM of that name.
            EngineError: QEMU would not die even after SIGKILL, or the driver is not open.
        """
        return await self._lifecycle.destroy(name)

    async def pause(self, name: str) -> VmStatus:
        """Stop the vCPUs (QMP ``stop``); memory and devices stay as they are.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running.
            EngineError: QEMU refused or did not answer, or the driver is not open.
        """
        return await self._lifecycle.pause(name)

    async def resume(self, name: str) -> VmStatus:
        """Restart the vCPUs of a paused VM (QMP ``cont``).

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not paused, or it migrated away (its guest runs elsewhere now).
            EngineError: QEMU refused or did not answer, or the driver is not open.
        """
        return await self._lifecycle.resume(name)

    async def reboot(self, name: str) -> VmStatus:
        """Reset the guest (QMP ``system_reset``), like pressing the reset button.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running.
            EngineError: QEMU refused or did not answer, or the driver is not open.
        """
        return await self._lifecycle.reboot(name)

    async def undefine(self, name: str) -> None:
        """Forget a powered-off VM and delete its directory (overlays and logs included).

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is powered on.
            EngineError: the directory cannot be removed, or the driver is not open.
        """
        await self._lifecycle.undefine(name)

    async def list(self) -> builtins.list[VmStatus]:
        """Every VM on this host, sorted by name.

        Raises:
            EngineError: the driver is not open.
        """
        self._table.require_open()
        return [vm.status() for vm in self._table.sorted()]

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
        return await self._telemetry.stats()

    # ---------------------------------------------------------------------------------------------
    # Live migration (hv.qemu.migration_source, hv.qemu.migration_destination)
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
        return await self._destination.incoming(spec, listen_host, policy)

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
        await self._source.send(name, uri, policy)

    async def migrate_wait(self, name: str, timeout_s: float) -> None:
        """Source: return on QEMU's next ``MIGRATION`` event (one since the previous call counts), or
        after ``timeout_s``.

        Raises:
            UnknownVm: no VM of that name.
        """
        await self._source.wait(name, timeout_s)

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
        return await self._source.sample(name)

    async def migrate_tune(self, name: str, *, downtime_ms: int) -> None:
        """Source: change the allowed downtime of the running pre-copy (``downtime-limit``).

        Raises:
            UnknownVm: no VM of that name.
            InvalidRequest: ``downtime_ms`` is below 1.
            InvalidState: no pre-copy migration is under way.
            EngineError: QEMU refused or does not answer.
        """
        await self._source.tune(name, downtime_ms=downtime_ms)

    async def migrate_postcopy(self, name: str) -> None:
        """Source: switch the running migration to post-copy (``migrate-start-postcopy``); from here
        it cannot be rolled back. A migration in post-copy already is left as it is.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: no migration is under way, or its policy did not allow post-copy.
            EngineError: QEMU refused or does not answer.
        """
        await self._source.postcopy(name)

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
        return await self._source.cancel(name)

    async def migrate_received(self, name: str) -> bool:
        """Destination: True once the incoming copy has loaded the whole stream (QEMU left
        ``inmigrate`` and its incoming migration says ``completed``), so it can run the guest, whether
        or not it runs already; False while it still receives, when its QEMU is gone or does not
        answer, and once migrate_finish has made it an ordinary VM.

        Raises:
            UnknownVm: no VM of that name.
        """
        return await self._destination.received(name)

    async def migrate_finish(self, name: str) -> VmStatus:
        """Destination: the stream has completed; stop the NBD exports (when disks were copied) and
        ``cont`` a copy that waits paused. The VM is an ordinary running VM from then on; one that
        runs already is returned as it is.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the copy is still receiving (QEMU ``inmigrate``), or its QEMU died.
            EngineError: QEMU refused, reports the guest unusable, or does not answer.
        """
        return await self._destination.finish(name)

    # ---------------------------------------------------------------------------------------------
    # Extras of this engine (not part of Driver)
    # ---------------------------------------------------------------------------------------------

    def vm_dir(self, name: str) -> Path:
        """The VM's runtime directory.

        Raises:
            UnknownVm: no VM of that name.
        """
        return self._table.get(name).dir

    def serial_log_path(self, name: str) -> Path:
        """Where the VM's serial port (COM1, ``ttyS0``) is logged; it starts empty at each start.

        Raises:
            UnknownVm: no VM of that name.
        """
        return self._table.get(name).dir / command_line.SERIAL_LOG

    def qemu_pid(self, name: str) -> int | None:
        """The pid of the VM's QEMU, or None when it is powered off.

        Raises:
            UnknownVm: no VM of that name.
        """
        qemu = self._table.get(name).qemu
        return qemu.pid if qemu is not None else None

    async def block_stats(self, name: str) -> builtins.list[BlockStats]:
        """I/O counters of the VM's disks (QMP ``query-blockstats``), by disk target.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not powered on.
            EngineError: QEMU did not answer.
        """
        return await self._telemetry.block_stats(name)


def _check_options(
    host_id: str,
    state_dir: Path | str | None,
    accel: str,
    kvm_probe_timeout_s: float,
    qmp_timeout_s: float,
    start_timeout_s: float,
) -> None:
    """Raises ValueError for an invalid host id, a missing state directory, an unknown accel or a
    non-positive deadline.
    """
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
