"""Telemetry of the qemu engine: per-VM samples (CPU, memory, dirty rate) and disk counters.

CPU use is QEMU's CPU time (``/proc/PID/stat``) since the previous sample, as a fraction of the
VM's vCPUs; memory is what the balloon reports; the dirty rate comes from QMP ``calc-dirty-rate``
(a 1 s measurement started at each sample and read at the next), or from the migration's own
measurement while the VM migrates away. The measurement's phase is a
:class:`~hv.qemu.phase.DirtyProbe` on the VM's QEMU.

Imports: :mod:`hv.driver` (types, errors), :mod:`hv.qemu.instance`, :mod:`hv.qemu.migration`,
:mod:`hv.qemu.phase`, :mod:`hv.qemu.process`, :mod:`hv.qemu.qmp` and :mod:`hv.qemu.vm_table` only.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time

import msgspec

from hv.driver import EngineError, VmStats
from hv.qemu import migration
from hv.qemu.instance import QemuInstance
from hv.qemu.phase import DirtyProbe
from hv.qemu.process import read_proc_stat, uptime_s
from hv.qemu.qmp import QmpSession, run_status
from hv.qemu.vm_table import Vm, VmTable

__all__ = ["BlockStats", "Telemetry"]

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class BlockStats(msgspec.Struct, frozen=True, kw_only=True):
    """I/O counters of one disk since QEMU started (from QMP ``query-blockstats``)."""

    target: str
    rd_bytes: int
    wr_bytes: int
    rd_operations: int
    wr_operations: int


class Telemetry:
    """Samples the VMs of one driver."""

    def __init__(self, table: VmTable) -> None:
        self.table = table

    async def stats(self) -> builtins.list[VmStats]:
        """A sample of every running or paused VM whose QEMU answers, sorted by name."""
        self.table.require_open()
        vms = self.table.sorted()
        samples = await asyncio.gather(*(self._sample(vm) for vm in vms if vm.state in ("running", "paused")))
        return [s for s in samples if s is not None]

    async def block_stats(self, name: str) -> builtins.list[BlockStats]:
        """I/O counters of the VM's disks, by disk target (errors: see QemuDriver.block_stats)."""
        vm = self.table.get(name)
        self.table.require_state(vm, "block_stats", frozenset({"running", "paused"}))
        qemu = vm.qemu
        assert qemu is not None
        result = await (await qemu.session()).execute("query-blockstats")
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

    async def _sample(self, vm: Vm) -> VmStats | None:
        qemu = vm.qemu
        if qemu is None or qemu.exited:
            return None
        state = vm.state
        memory_mib = vm.spec.memory_mib
        dirty = 0.0
        try:
            qmp = await qemu.session()
            state = "running" if run_status(await qmp.execute("query-status")) == "running" else "paused"
            if vm.spec.balloon:
                balloon = await qmp.execute("query-balloon")
                if isinstance(balloon, dict) and "actual" in balloon:
                    memory_mib = int(balloon["actual"]) // MIB
            if state == "running":
                dirty = await _dirty_rate(vm, qemu, qmp)
        except EngineError as exc:
            log.debug("vm %s: left out of this stats sample: %s", vm.name, exc)
            return None
        return VmStats(
            name=vm.name,
            state=state,
            cpu_util=_cpu_util(vm, qemu),
            dirty_mib_s=dirty,
            memory_mib=memory_mib,
        )


def _cpu_util(vm: Vm, qemu: QemuInstance) -> float:
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


async def _dirty_rate(vm: Vm, qemu: QemuInstance, qmp: QmpSession) -> float:
    """The latest dirty-page rate from ``calc-dirty-rate`` (MiB/s); starts the next measurement.

    While the VM migrates away, the migration's own measurement is used instead: a
    ``calc-dirty-rate`` hashing pages next to the migration stream slowed QEMU's migration by a
    third here (bench/migrate).
    """
    if qemu.migration.migrating:
        info = await qmp.execute("query-migrate")
        if isinstance(info, dict):
            rate = migration.sample_from_query(info).dirty_rate_bytes_s / MIB
            if rate > 0:
                qemu.dirty_mib_s = rate
        return qemu.dirty_mib_s
    if qemu.dirty is DirtyProbe.UNSUPPORTED:
        return 0.0
    try:
        if qemu.dirty is DirtyProbe.MEASURING:
            info = await qmp.execute("query-dirty-rate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "measuring":
                return qemu.dirty_mib_s
            if isinstance(info, dict) and status == "measured":
                qemu.dirty_mib_s = float(info.get("dirty-rate", 0))
            qemu.dirty = DirtyProbe.IDLE
        await qmp.execute("calc-dirty-rate", {"calc-time": 1})
        qemu.dirty = DirtyProbe.MEASURING
    except EngineError as exc:
        if qemu.exited:
            raise
        # Cheap where it works; where it does not, report 0.0 rather than fail telemetry.
        qemu.dirty = DirtyProbe.UNSUPPORTED
        log.info("vm %s: qemu cannot measure the dirty-page rate (%s); reporting 0", vm.name, exc)
    return qemu.dirty_mib_s
