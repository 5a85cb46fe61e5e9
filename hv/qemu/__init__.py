"""The qemu hypervisor engine: real guests, one QEMU process per VM, driven over QMP.

:class:`~hv.qemu.driver.QemuDriver` is the engine. The modules beside it each do one job:
:mod:`~hv.qemu.host` (what the host and QEMU offer), :mod:`~hv.qemu.accel` (KVM or TCG, probed),
:mod:`~hv.qemu.image_policy` (which files a VM may use), :mod:`~hv.qemu.command_line` (the QEMU
argument list), :mod:`~hv.qemu.process` (detached processes), :mod:`~hv.qemu.qmp` (the QMP
session) and :mod:`~hv.qemu.migration` (the live migration URI and QMP's migration answers).
:mod:`hv.engines` imports this package only when the qemu engine is chosen.
"""

from hv.qemu.driver import BlockStats, QemuDriver
from hv.qemu.errors import InvalidSpec

__all__ = ["BlockStats", "InvalidSpec", "QemuDriver"]
