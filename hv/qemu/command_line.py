"""The QEMU command line of a VM, built from its spec and checked paths. Pure: no I/O here.

:func:`spec_problems` says what a spec asks for that QEMU here cannot do (before anything is
created), and :func:`build_argv` turns a :class:`LaunchPlan` into an argument list for
``posix_spawn``: never a shell string. Conventions:

- ``-nodefaults -no-user-config -display none``: QEMU adds no device and reads no config of its own;
  every device is on the command line.
- ``-sandbox on,...`` (seccomp): no fork/exec, no setuid, no obsolete syscalls. A bridge NIC needs
  ``qemu-bridge-helper``, so those VMs may spawn it (``spawn=allow,elevateprivileges=children``).
- Disks are explicit ``-blockdev`` chains (JSON) with ``backing: null`` at the bottom, so QEMU opens
  exactly the layers :mod:`hv.qemu.image_policy` checked and follows no path stored in an image.
  Every layer below the top is ``read-only``, and so is the top when the guest must not write:
  ``readonly``, or a disk without an overlay (often a shared image) that the spec does not mark
  ``writable``.
- pc and q35 get PCI virtio devices (``virtio-*-pci``); microvm has no PCI, so it gets virtio-mmio
  ones (``virtio-*-device``) and can carry neither SATA nor e1000.
- QMP listens on the socket the driver binds and passes in as fd :data:`hv.qemu.process.QMP_FD`.
- The destination of a live migration is the same command line plus ``-incoming defer``: the
  device model must match the source's exactly, so both come from the same spec through here.

Pure. Imports: :mod:`hv.qemu.host`, :mod:`hv.qemu.image_policy` and :mod:`hv.qemu.process`
(constants and types) and :mod:`protocols.vmspec` only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hv.qemu.host import SANDBOX_OPTIONS
from hv.qemu.image_policy import ImageLayer
from hv.qemu.process import QMP_FD
from protocols.vmspec import DiskSpec, NicSpec, VmSpec

__all__ = [
    "CONSOLE_LOG",
    "PID_FILE",
    "QEMU_LOG",
    "QMP_SOCKET",
    "SERIAL_LOG",
    "DiskPlan",
    "LaunchPlan",
    "build_argv",
    "cpu_model_for",
    "mac_address",
    "spec_problems",
    "top_node_name",
]

# Files in a VM's runtime directory.
SERIAL_LOG = "serial.log"
CONSOLE_LOG = "console.log"
PID_FILE = "qemu.pid"
QMP_SOCKET = "qmp.sock"
QEMU_LOG = "qemu.log"

#: Machine types without PCI: their virtio devices sit on virtio-mmio.
_MMIO_MACHINES = frozenset({"microvm"})
#: Ports of one AHCI controller.
AHCI_PORTS = 6
#: Under TCG the guest gets this much RAM beyond its memory_mib. QEMU before 9.0 syncs the dirty
#: bitmap of a RAM block whose size is a multiple of 256 KiB on a fast path that forgets to re-arm
#: TCG's write tracking, so a page the guest keeps writing through a cached TLB entry stops being
#: seen as dirty and reaches a migration's destination stale (measured with QEMU 7.2: the tiny
#: guest's counter page, seconds out of date). Any other size takes the path that re-arms it; QEMU
#: rounds the RAM to 8 KiB.
TCG_RAM_PAD_KIB = 8


@dataclass(frozen=True, slots=True)
class DiskPlan:
    """One disk as QEMU will open it: the spec and its checked layers, the top first.

    With an overlay, ``layers[0]`` is the VM's own qcow2 in its runtime directory.
    """

    spec: DiskSpec
    layers: tuple[ImageLayer, ...]


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything :func:`build_argv` needs; every path in it has been checked already."""

    spec: VmSpec
    accel: Literal["kvm", "tcg"]
    vm_dir: Path
    kernel: Path | None = None
    initrd: Path | None = None
    disks: tuple[DiskPlan, ...] = ()
    sandbox: bool = True
    #: Wait for an incoming migration (``-incoming defer``: the driver gives the URI over QMP).
    incoming: bool = False
    #: Start with the vCPUs stopped (``-S``): after an incoming migration too, until ``cont``.
    start_paused: bool = False
    #: RAM beyond ``memory_mib``, in KiB (see :data:`TCG_RAM_PAD_KIB`).
    ram_pad_kib: int = 0


def is_mmio(machine: str) -> bool:
    return machine in _MMIO_MACHINES


def cpu_model_for(spec: VmSpec, accel: str) -> str:
    """QEMU's ``-cpu`` value: ``host`` only for host-passthrough under KVM; ``max`` (every feature
    the accelerator can offer) otherwise; the named model for ``custom``.
    """
    if spec.cpu_mode == "custom":
        return spec.cpu_model
    if spec.cpu_mode == "host-passthrough" and accel == "kvm":
        return "host"
    return "max"


def spec_problems(spec: VmSpec, *, machine_types: Sequence[str], cpu_models: Sequence[str]) -> list[str]:
    """What in ``spec`` QEMU here cannot run, each with the fix; empty when it can run it."""
    problems: list[str] = []
    if spec.machine not in machine_types:
        problems.append(f"machine type {spec.machine!r} is not offered by this QEMU; use pc or q35")
    problems += _cpu_problems(spec, cpu_models)
    if spec.current_memory_mib is not None and spec.current_memory_mib > spec.memory_mib:
        problems.append(
            f"current_memory_mib ({spec.current_memory_mib}) exceeds memory_mib ({spec.memory_mib}); "
            "the balloon can only give memory back"
        )
    problems += _boot_problems(spec)
    problems += _disk_problems(spec)
    problems += _nic_problems(spec)
    return problems


def _cpu_problems(spec: VmSpec, cpu_models: Sequence[str]) -> list[str]:
    if spec.cpu_mode != "custom":
        return []
    if not spec.cpu_model:
        return ["cpu_mode 'custom' needs a cpu_model, e.g. 'Skylake-Server'"]
    if cpu_models and spec.cpu_model not in cpu_models:
        return [
            f"cpu_model {spec.cpu_model!r} is unknown to this QEMU; `qemu-system-x86_64 -cpu help` "
            "lists the models"
        ]
    return []


def _boot_problems(spec: VmSpec) -> list[str]:
    problems: list[str] = []
    boot = spec.boot
    if boot.kernel is None:
        if boot.initrd is not None:
            problems.append("boot.initrd needs boot.kernel; give the kernel too")
        if boot.cmdline:
            problems.append("boot.cmdline needs boot.kernel (a disk boots with its own command line)")
        if not spec.disks:
            problems.append("there is nothing to boot: give boot.kernel or at least one disk")
    for what, path in (("boot.kernel", boot.kernel), ("boot.initrd", boot.initrd)):
        if path is not None and ("," in path or "\n" in path):
            problems.append(
                f"{what} {path!r} contains a comma or newline, which QEMU would misread; rename it"
            )
    return problems


def _disk_problems(spec: VmSpec) -> list[str]:
    problems: list[str] = []
    targets = [disk.target for disk in spec.disks]
    for target in sorted({t for t in targets if targets.count(t) > 1}):
        problems.append(f"disk target {target!r} is used twice; give every disk its own target")
    sata = [disk for disk in spec.disks if disk.bus == "sata"]
    if sata and is_mmio(spec.machine):
        problems.append(f"machine {spec.machine!r} has no PCI, so no SATA controller; use bus=virtio")
    if len(sata) > AHCI_PORTS:
        problems.append(f"{len(sata)} SATA disks exceed the {AHCI_PORTS} ports of the AHCI controller")
    for disk in sata:
        if disk.readonly:
            problems.append(
                f"disk {disk.target}: QEMU's SATA disk (ide-hd) cannot be read-only; use bus=virtio"
            )
        elif disk.guest_read_only:
            problems.append(
                f"disk {disk.target}: without an overlay the image opens read-only (it may be shared), "
                "and QEMU's SATA disk (ide-hd) cannot be read-only; use bus=virtio, keep the overlay, "
                "or set writable: true if this VM alone owns the image"
            )
    return problems


def _nic_problems(spec: VmSpec) -> list[str]:
    problems: list[str] = []
    for index, nic in enumerate(spec.nics):
        if nic.model == "e1000" and is_mmio(spec.machine):
            problems.append(
                f"nic {index}: machine {spec.machine!r} has no PCI for an e1000; use model=virtio"
            )
        if nic.mode in ("tap", "bridge") and not nic.device:
            thing = "tap device" if nic.mode == "tap" else "bridge"
            problems.append(f"nic {index}: mode={nic.mode} needs device=<{thing} name>")
    return problems


def mac_address(vm: str, index: int) -> str:
    """A stable, locally administered MAC for NIC ``index`` of ``vm`` (QEMU's own default is the same
    for every VM, which collides on a shared bridge).
    """
    digest = hashlib.blake2b(f"{vm}/{index}".encode(), digest_size=3).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest)


def build_argv(binary: str, plan: LaunchPlan) -> list[str]:
    """The complete QEMU argument list for ``plan``, ``binary`` first."""
    spec = plan.spec
    vm_dir = plan.vm_dir
    bus = "device" if is_mmio(spec.machine) else "pci"
    machine: list[str] = [spec.machine]
    if "acpi" not in spec.features:
        machine.append("acpi=off")
    argv = [
        binary,
        "-name", f"guest={_opt(spec.name)},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-msg", "timestamp=on",
        "-machine", ",".join(machine),
        "-accel", plan.accel,
        "-cpu", cpu_model_for(spec, plan.accel),
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib * 1024 + plan.ram_pad_kib}K" if plan.ram_pad_kib else f"{spec.memory_mib}M",
        "-pidfile", str(vm_dir / PID_FILE),
        "-chardev", f"socket,id=qmp,fd={QMP_FD},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"file,id=serial0,path={_opt(str(vm_dir / SERIAL_LOG))}",
        "-serial", "chardev:serial0",
    ]  # fmt: skip
    if plan.incoming:
        argv += ["-incoming", "defer"]
    if plan.start_paused:
        argv.append("-S")
    if plan.sandbox:
        bridged = any(nic.mode == "bridge" for nic in spec.nics)
        argv += ["-sandbox", _sandbox_options(allow_helper=bridged)]
    if plan.kernel is not None:
        argv += ["-kernel", str(plan.kernel)]
        if plan.initrd is not None:
            argv += ["-initrd", str(plan.initrd)]
        if spec.boot.cmdline:
            argv += ["-append", spec.boot.cmdline]
    argv += _disk_args(plan.disks, bus=bus, boot_from_disk=plan.kernel is None)
    for index, nic in enumerate(spec.nics):
        argv += _nic_args(spec.name, index, nic, bus=bus)
    if spec.console:
        argv += [
            "-device", f"virtio-serial-{bus},id=vser0",
            "-chardev", f"file,id=console0,path={_opt(str(vm_dir / CONSOLE_LOG))}",
            "-device", "virtconsole,chardev=console0,id=console0,bus=vser0.0",
        ]  # fmt: skip
    if spec.rng:
        argv += ["-object", "rng-builtin,id=rng0", "-device", f"virtio-rng-{bus},rng=rng0,id=rng0"]
    if spec.balloon:
        argv += ["-device", f"virtio-balloon-{bus},id=balloon0"]
    return argv


def _sandbox_options(*, allow_helper: bool) -> str:
    if not allow_helper:
        return SANDBOX_OPTIONS
    return SANDBOX_OPTIONS.replace("spawn=deny", "spawn=allow").replace(
        "elevateprivileges=deny", "elevateprivileges=children"
    )


def _disk_args(disks: Sequence[DiskPlan], *, bus: str, boot_from_disk: bool) -> list[str]:
    argv: list[str] = []
    sata_port = 0
    for index, disk in enumerate(disks):
        top = _blockdev_chain(disk, argv)
        boot = f",bootindex={index + 1}" if boot_from_disk else ""
        if disk.spec.bus == "sata":
            if sata_port == 0:
                argv += ["-device", "ahci,id=sata0"]
            argv += ["-device", f"ide-hd,bus=sata0.{sata_port},drive={top},id=disk-{disk.spec.target}{boot}"]
            sata_port += 1
        else:
            argv += ["-device", f"virtio-blk-{bus},drive={top},id=disk-{disk.spec.target}{boot}"]
    return argv


def top_node_name(target: str) -> str:
    """The node name of a disk's top layer (its overlay, when it has one): what the guest writes to."""
    return f"{target}-fmt0"


def _blockdev_chain(disk: DiskPlan, argv: list[str]) -> str:
    """Append the disk's -blockdev nodes, base first, to ``argv``; return the top node's name."""
    target = disk.spec.target
    below: str | None = None
    depth = len(disk.layers)
    for level in range(depth - 1, -1, -1):  # from the base (last) up to the top (first)
        layer = disk.layers[level]
        read_only = disk.spec.guest_read_only or level > 0
        file_node, format_node = f"{target}-file{level}", f"{target}-fmt{level}"
        argv += [
            "-blockdev",
            _json(
                {
                    "driver": "file",
                    "filename": str(layer.path),
                    "node-name": file_node,
                    "read-only": read_only,
                    "discard": "unmap",
                }
            ),
        ]
        node: dict[str, object] = {
            "driver": layer.format,
            "file": file_node,
            "node-name": format_node,
            "read-only": read_only,
        }
        if layer.format == "qcow2":
            node["backing"] = below  # None -> JSON null: open no backing file stored in the image
        argv += ["-blockdev", _json(node)]
        below = format_node
    assert below is not None, "a disk has at least one layer"
    return below


def _nic_args(vm: str, index: int, nic: NicSpec, *, bus: str) -> list[str]:
    netdev = f"net{index}"
    if nic.mode == "user":
        backend = f"user,id={netdev}"
    elif nic.mode == "tap":
        backend = f"tap,id={netdev},ifname={nic.device},script=no,downscript=no"
    else:
        backend = f"bridge,id={netdev},br={nic.device}"
    model = f"virtio-net-{bus}" if nic.model == "virtio" else "e1000"
    mac = nic.mac or mac_address(vm, index)
    return ["-netdev", backend, "-device", f"{model},netdev={netdev},mac={mac},id=nic{index}"]


def _opt(value: str) -> str:
    """A value for QEMU's key=value option syntax: a comma is written twice."""
    return value.replace(",", ",,")


def _json(value: dict[str, object]) -> str:
    return json.dumps(value, separators=(",", ":"))
