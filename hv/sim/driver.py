"""The sim hypervisor engine's driver: a deterministic, in-memory stand-in for a host and its VMs.

:class:`SimDriver` implements :class:`hv.driver.Driver` without running any guest. It powers the
demo, fleet-scale tests with thousands of hosts in one process, and trace-driven evaluation, so it is
cheap: a driver owns no task, and a booting VM is one timer on the shared :class:`hv.sim.clock.Clock`.

The driver checks each call and delegates to its parts, which it wires together with callbacks:

- :mod:`hv.sim.host_model`: the host (arch, cores, memory, CPU features, a linear power model in
  watts) and each VM's CPU use and dirty-page rate, taken from ``spec.workload`` with a small
  deterministic wobble;
- :mod:`hv.sim.vm_table`: the VMs, their boot timers and the transitions every call shares;
- :mod:`hv.sim.state_file`: like a real engine's, its VMs outlive the agent: with a ``state_dir`` the
  VM table is written to ``sim-vms.json`` after every change and read back by :meth:`SimDriver.open`;
  :meth:`SimDriver.close` leaves VMs as they are;
- :mod:`hv.sim.migration_calls`: the ``migrate_*`` calls, on either side of a migration;
- :mod:`hv.sim.controls`: what tests and demos do beyond the Driver interface (workload changes,
  crash injection, the host's own load).

Live migrations (:mod:`hv.sim.migration`) follow the pre-copy model of :mod:`protocols.migration` on
the driver's clock. The source and destination are two drivers that never talk to each other: the
destination only holds an ``incoming`` copy until ``migrate_finish``, and the source replays its
migration from a persisted record whenever someone looks (``migrate_sample``, ``list``, ...).

Every call runs to completion without awaiting, so calls on one driver never interleave.

Imports :mod:`hv.driver`, :mod:`hv.host_checks`, the other :mod:`hv.sim` modules and :mod:`protocols`;
no sim part imports this module.
"""

from __future__ import annotations

import builtins
import pathlib
from collections.abc import Mapping

from hv.driver import (
    POWERED_OFF,
    POWERED_ON,
    Driver,
    VmExists,
    VmStats,
)
from hv.host_checks import require_valid_host_id
from hv.sim.clock import Clock, RealClock
from hv.sim.controls import SimControls
from hv.sim.host_model import DEFAULT_LINK_MIB_S, HostModel, HostSample
from hv.sim.migration_calls import MigrationCalls
from hv.sim.state_file import STATE_FILE, StateFile
from hv.sim.vm import Vm
from hv.sim.vm_table import VmTable
from protocols.messages import Capabilities, VmStatus
from protocols.migration import MigrationPolicy, MigrationSample
from protocols.vmspec import VmSpec

__all__ = ["SimDriver"]


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
        require_valid_host_id(host_id)
        self._host = HostModel(
            host_id=host_id,
            cores=cores,
            memory_mib=memory_mib,
            disk_gib=disk_gib,
            arch=arch,
            cpu_features=cpu_features,
            power_idle_w=power_idle_w,
            power_max_w=power_max_w,
            seed=seed,
            migration_bandwidth_mib_s=migration_bandwidth_mib_s,
        )
        self.host_id = host_id
        self.state_dir = state_dir
        self.clock: Clock = clock if clock is not None else RealClock()
        self._store = None if state_dir is None else StateFile(state_dir / STATE_FILE, host_id)
        self._table = VmTable(host_id=host_id, clock=self.clock, save=self._save, emit=self.emit)
        self._controls = SimControls(table=self._table, host=self._host, emit=self.emit)
        self._migrations = MigrationCalls(table=self._table, host=self._host)

    @property
    def state_file(self) -> pathlib.Path | None:
        """Where the VM table is persisted, or None when the driver keeps it in memory only."""
        return None if self._store is None else self._store.path

    # The host's fixed properties, read-only, as the constructor took them.

    @property
    def cores(self) -> int:
        """The host's CPU cores."""
        return self._host.cores

    @property
    def memory_mib(self) -> int:
        """The host's memory, in MiB."""
        return self._host.memory_mib

    @property
    def disk_gib(self) -> int:
        """The host's disk, in GiB."""
        return self._host.disk_gib

    @property
    def arch(self) -> str:
        """The host's CPU architecture."""
        return self._host.arch

    @property
    def cpu_features(self) -> builtins.list[str]:
        """The host CPU's feature flags."""
        return self._host.cpu_features

    @property
    def guest_arches(self) -> builtins.list[str]:
        """The guest architectures the host runs."""
        return self._host.guest_arches

    @property
    def power_idle_w(self) -> float:
        """The host's power draw with idle CPUs, in watts."""
        return self._host.power_idle_w

    @property
    def power_max_w(self) -> float:
        """The host's power draw with all CPUs busy, in watts."""
        return self._host.power_max_w

    @property
    def seed(self) -> int:
        """The seed of the VMs' load wobble."""
        return self._host.seed

    @property
    def migration_bandwidth_mib_s(self) -> float:
        """The host's migration link, in MiB/s."""
        return self._host.migration_bandwidth_mib_s

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
        self._table.detach()
        loaded = None
        if self._store is not None:
            loaded = {
                s.spec.name: Vm.from_saved(s, self._host.phases(s.spec.name)) for s in self._store.load()
            }
        self._table.open(loaded)

    async def close(self) -> None:
        """Detach: pending boot timers are dropped, VMs keep their state (and on disk, their file)."""
        self._table.close()

    async def capabilities(self) -> Capabilities:
        """The simulated host's capabilities."""
        return self._host.capabilities()

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
        self._table.require_open()
        existing = self._table.lookup(spec.name)
        if existing is not None:
            raise VmExists(
                f"vm {spec.name!r} already exists on host {self.host_id!r} (it is {existing.state}); "
                "pick another name, or undefine the existing VM first"
            )
        self._host.require_fits(spec, self._table.all())
        vm = Vm(spec, "defined", self._host.phases(spec.name))
        self._table.add(vm)
        return vm.status()

    async def start(self, name: str) -> VmStatus:
        """Power a defined, stopped or crashed VM on.

        With ``spec.workload.boot_s > 0`` the VM is ``starting`` for that many seconds of clock time,
        then becomes ``running`` and a ``started`` event is emitted; otherwise it is running at once.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is already powered on (starting, running, paused or stopping).
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._table.get(name)
        self._table.require_state(vm, "start", POWERED_OFF)
        now = self.clock.now()
        vm.started_at = now
        vm.reason = ""
        boot_s = vm.spec.workload.boot_s
        if boot_s > 0:
            self._table.begin_boot(vm, now + boot_s)
        else:
            vm.state = "running"
        self._table.save()
        return vm.status()

    async def shutdown(self, name: str, timeout_s: float) -> VmStatus:
        """Power a starting, running or paused VM off gracefully (the sim's guests always comply).

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not powered on.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._table.get(name)
        self._table.require_state(vm, "shutdown", POWERED_ON)
        self._table.power_off(vm, "stopped")
        return vm.status()

    async def destroy(self, name: str) -> VmStatus:
        """Power a VM off at once. A VM that is already off (defined or stopped) is left as it is.

        A crashed VM becomes ``stopped``.

        Raises:
            UnknownVm: no VM of that name.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._table.get(name)
        if vm.state in ("defined", "stopped"):
            return vm.status()
        self._table.power_off(vm, "stopped")
        return vm.status()

    async def pause(self, name: str) -> VmStatus:
        """Freeze a running VM's vCPUs: it keeps its memory but uses no CPU and dirties no pages.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._table.get(name)
        self._table.require_state(vm, "pause", frozenset({"running"}))
        vm.state = "paused"
        self._table.save()
        return vm.status()

    async def resume(self, name: str) -> VmStatus:
        """Unfreeze a paused VM.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not paused.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._table.get(name)
        self._table.require_state(vm, "resume", frozenset({"paused"}))
        vm.state = "running"
        self._table.save()
        return vm.status()

    async def reboot(self, name: str) -> VmStatus:
        """Reset a running guest: it stays running and its ``started_at`` becomes now.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not running.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._table.get(name)
        self._table.require_state(vm, "reboot", frozenset({"running"}))
        vm.started_at = self.clock.now()
        self._table.save()
        return vm.status()

    async def undefine(self, name: str) -> None:
        """Forget a VM that is powered off (defined, stopped or crashed), or an ``incoming`` copy.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is powered on.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        vm = self._table.get(name)
        self._table.require_state(vm, "undefine", POWERED_OFF | {"incoming"})
        self._table.remove(name)

    async def list(self) -> builtins.list[VmStatus]:
        """Every VM on this host, sorted by name, ``incoming`` copies included.

        Raises:
            EngineError: the driver is not open.
        """
        self._table.require_open()
        self._table.sync_all()
        return [vm.status() for vm in self._table.by_name()]

    async def stats(self) -> builtins.list[VmStats]:
        """A sample of every running or paused VM at the clock's current time, sorted by name.

        ``incoming`` copies are not sampled: they run no guest yet.

        Raises:
            EngineError: the driver is not open.
        """
        self._table.require_open()
        self._table.sync_all()
        now = self.clock.now()
        return [
            self._host.vm_stats(vm, now) for vm in self._table.by_name() if vm.state in ("running", "paused")
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
        return self._migrations.incoming(spec, listen_host, policy=policy)

    def migration_uri(self, name: str) -> str:
        """Where a source sends VM ``name`` to reach this host: ``sim://HOST/NAME``."""
        return self._migrations.uri(name)

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
        self._migrations.send(name, uri, policy)

    async def migrate_sample(self, name: str) -> MigrationSample:
        """Source: the migration's progress at the clock's current time; status ``none`` if none.

        Raises:
            UnknownVm: no VM of that name.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        return self._migrations.sample(name)

    async def migrate_tune(self, name: str, *, downtime_ms: int) -> None:
        """Source: allow ``downtime_ms`` from now on; it counts from the next round's end.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: no pre-copy migration of the VM is under way.
            InvalidRequest: ``downtime_ms`` is below 1.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        self._migrations.tune(name, downtime_ms=downtime_ms)

    async def migrate_postcopy(self, name: str) -> None:
        """Source: switch to post-copy. The guest leaves the source at once (``paused``, migrated) and
        the migration completes once what is still dirty has been sent.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: no pre-copy migration is under way, or its policy does not allow post-copy.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        self._migrations.postcopy(name)

    async def migrate_cancel(self, name: str) -> VmStatus:
        """Source: cancel a pre-copy migration under way, and make sure a paused VM runs again.

        With no migration under way (none, cancelled or failed) only the second half applies. A VM that
        is powered off is returned as it is: starting it is the caller's decision.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the migration completed or is in post-copy: the guest runs on the destination.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        return self._migrations.cancel(name)

    async def migrate_finish(self, name: str) -> VmStatus:
        """Destination: make the incoming copy an ordinary running VM (a running VM is returned as is).

        The sim destination cannot tell whether the stream completed: that is the caller's call.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is neither incoming nor running.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        return self._migrations.finish(name)

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
        self._controls.set_workload(name, cpu_util=cpu_util, dirty_mib_s=dirty_mib_s)

    def inject_crash(self, name: str, reason: str = "injected crash") -> VmStatus:
        """Make a powered-on VM crash, as if its guest or its emulator died, and emit ``crashed``.

        Raises:
            UnknownVm: no VM of that name.
            InvalidState: the VM is not powered on.
            EngineError: the driver is not open, or the state file cannot be written.
        """
        return self._controls.inject_crash(name, reason)

    def host_sample(self) -> HostSample:
        """The host's CPU use (0..1), memory held by powered-on VMs, and power draw, right now.

        ``incoming`` copies hold their memory but use no CPU. CPU use is the running VMs'
        ``cpu_util * vcpus`` (less auto-converge's throttle) summed over the host's cores, capped at 1;
        power is linear between ``power_idle_w`` and ``power_max_w`` in CPU use.

        Raises:
            EngineError: the driver is not open.
        """
        return self._controls.host_sample()

    # ---------------------------------------------------------------------------------------------
    # Internals
    # ---------------------------------------------------------------------------------------------

    def _save(self, vms: Mapping[str, Vm]) -> None:
        if self._store is not None:
            self._store.save(vms)
