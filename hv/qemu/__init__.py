"""The qemu hypervisor engine: real guests, one QEMU process per VM, driven over QMP.

:class:`~hv.qemu.driver.QemuDriver` is the engine, a facade over parts that each do one job
(its module docstring lists them): host facts (:mod:`~hv.qemu.host`, :mod:`~hv.qemu.accel`,
:mod:`~hv.qemu.host_facts`), launching (:mod:`~hv.qemu.launch`, :mod:`~hv.qemu.image_policy`,
:mod:`~hv.qemu.command_line`), processes (:mod:`~hv.qemu.process`, :mod:`~hv.qemu.instance`,
:mod:`~hv.qemu.qmp`), VMs (:mod:`~hv.qemu.vm_table`, :mod:`~hv.qemu.phase`,
:mod:`~hv.qemu.lifecycle`, :mod:`~hv.qemu.vm_events`, :mod:`~hv.qemu.reattach`,
:mod:`~hv.qemu.telemetry`) and live migration (:mod:`~hv.qemu.migration`,
:mod:`~hv.qemu.migration_source`, :mod:`~hv.qemu.migration_destination`,
:mod:`~hv.qemu.storage_copy`). Only this package's ``__init__`` imports the driver; no part does.
:mod:`hv.engines` imports this package only when the qemu engine is chosen.
"""

from hv.qemu.driver import BlockStats, QemuDriver
from hv.qemu.errors import InvalidSpec

__all__ = ["BlockStats", "InvalidSpec", "QemuDriver"]
