"""What a VM needs before QEMU runs: its spec checked, its files confined, its launch plan.

:class:`Launcher` re-validates a spec (field constraints, and what this QEMU's machine types and
CPU models allow), checks that it fits the host, confines its kernel, initrd and disk backing
chains to the image directories (:mod:`hv.qemu.image_policy`), and turns a VM into a
:class:`~hv.qemu.command_line.LaunchPlan`, creating missing overlays.

Imports: :mod:`hv.driver` (errors), :mod:`hv.qemu.command_line`, :mod:`hv.qemu.errors`,
:mod:`hv.qemu.host_facts`, :mod:`hv.qemu.image_policy` and :mod:`protocols.vmspec` only.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import msgspec

from hv.driver import InsufficientResources
from hv.qemu import command_line
from hv.qemu.errors import InvalidSpec
from hv.qemu.host_facts import HostFacts
from hv.qemu.image_policy import ImageLayer, ImagePolicy
from protocols.vmspec import VmSpec, explain_validation_error

__all__ = ["Launcher"]


class Launcher:
    """Checks specs and plans launches for one host; :attr:`facts` is set when the driver opens."""

    def __init__(self, *, host_id: str, policy: ImagePolicy, sandbox: bool) -> None:
        self.host_id = host_id
        self.policy = policy
        self.sandbox = sandbox
        self.facts: HostFacts | None = None

    def _facts(self) -> HostFacts:
        assert self.facts is not None, "the driver is open"
        return self.facts

    def validated(self, spec: VmSpec) -> VmSpec:
        """The spec, re-checked against its field constraints (a Struct built in code skips them).

        Raises:
            InvalidSpec: it breaks a constraint, or asks for what this QEMU cannot do.
        """
        try:
            spec = msgspec.convert(msgspec.to_builtins(spec), VmSpec)
        except msgspec.ValidationError as exc:
            raise InvalidSpec(f"vm spec rejected: {explain_validation_error(exc)}") from None
        info = self._facts().info
        problems = command_line.spec_problems(
            spec, machine_types=info.machine_types, cpu_models=info.cpu_models
        )
        if problems:
            raise InvalidSpec(f"vm {spec.name!r}: " + "; ".join(problems))
        return spec

    def check_resources(self, spec: VmSpec, defined: Collection[VmSpec]) -> None:
        """Raises InsufficientResources when the arch is not run here or the memory does not fit
        beside that of the ``defined`` VMs.
        """
        caps = self._facts().caps
        if spec.arch not in caps.guest_arches:
            raise InsufficientResources(
                f"vm {spec.name!r} is {spec.arch} but host {self.host_id!r} runs only "
                f"{', '.join(caps.guest_arches) or 'no'} guests under QEMU; place it on a {spec.arch} host"
            )
        committed = sum(other.memory_mib for other in defined)
        free = caps.memory_mib - committed
        if spec.memory_mib > free:
            raise InsufficientResources(
                f"vm {spec.name!r} needs {spec.memory_mib} MiB of memory but host {self.host_id!r} has "
                f"{free} MiB free ({committed} of {caps.memory_mib} MiB held by {len(defined)} defined "
                "VMs); undefine VMs that are not needed or place it on another host"
            )

    async def check_files(self, spec: VmSpec) -> None:
        """Confine the kernel, initrd and every disk's backing chain to the image directories.

        Raises:
            InvalidSpec: a file is missing or outside them.
        """
        if spec.boot.kernel is not None:
            self.policy.confine(spec.name, "boot.kernel", spec.boot.kernel)
        if spec.boot.initrd is not None:
            self.policy.confine(spec.name, "boot.initrd", spec.boot.initrd)
        for disk in spec.disks:
            await self.policy.disk_chain(spec.name, f"disk {disk.target} source", disk.source, disk.format)

    async def plan(self, spec: VmSpec, vm_dir: Path) -> command_line.LaunchPlan:
        """Check the files again (they may have changed since define) and create missing overlays.

        Raises:
            InvalidSpec: a file has moved out of the image directories.
            EngineError: an overlay cannot be created.
        """
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
                overlay = vm_dir / f"disk-{disk.target}.qcow2"
                if not overlay.exists():
                    await self.policy.create_overlay(spec.name, overlay, chain[0], chain[0].virtual_size)
                layers = (
                    ImageLayer(path=overlay, format="qcow2", virtual_size=chain[0].virtual_size),
                    *chain,
                )
            disks.append(command_line.DiskPlan(spec=disk, layers=layers))
        accel = self._facts().accel.accel
        return command_line.LaunchPlan(
            spec=spec,
            accel=accel,
            vm_dir=vm_dir,
            kernel=kernel,
            initrd=initrd,
            disks=tuple(disks),
            sandbox=self.sandbox,
            ram_pad_kib=command_line.TCG_RAM_PAD_KIB if accel == "tcg" else 0,
        )
