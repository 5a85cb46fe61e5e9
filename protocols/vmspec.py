"""The VM spec: what an operator asks for, and what travels to the agent that runs it.

It is the single definition used by the REST API (JSON), the CLI (YAML or JSON files) and the bus
(MessagePack). Constraints live on the fields, so every entry point rejects the same bad input with
the same message. Schema evolution follows the wire rules: new fields get a default, nothing is
retyped or reordered.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

# Every pattern ends in ``\Z``, never ``$``: msgspec matches with ``re.search``, and ``$`` also
# matches before a final newline, so ``^[a-z]+$`` accepts "vm-a\n" (a directory name with a newline,
# a topic with one). In Python code, match these with ``fullmatch``.

#: VM names end up in URLs, file names and QEMU arguments: letters (either case), digits, '.', '_'
#: and '-', 1-63 characters, starting and ending with a letter or digit. That takes the names libvirt
#: users have (``QEMUGuest1``, ``fedora-38``, ``win10_x64``, ``rhel9.2``) as they are, and keeps out
#: what is unsafe there: '/', spaces, a leading '.', control and non-ASCII characters.
VM_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?\Z"
VM_NAME_RE = re.compile(VM_NAME_PATTERN)
HOST_ID_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?\Z"
HOST_ID_RE = re.compile(HOST_ID_PATTERN)
LABEL_PATTERN = r"^[A-Za-z0-9._/-]{1,63}\Z"
HOST_PATH_PATTERN = r"^/[^\x00]{0,4095}\Z"
DISK_TARGET_PATTERN = r"^(vd|sd|hd)[a-z]{1,2}\Z"
MAC_PATTERN = r"^([0-9a-f]{2}:){5}[0-9a-f]{2}\Z"

VmName = Annotated[
    str,
    msgspec.Meta(
        pattern=VM_NAME_PATTERN,
        description="letters, digits, '.', '_' and '-', 1-63 characters, starting and ending with a letter or digit",
    ),
]
HostId = Annotated[
    str,
    msgspec.Meta(
        pattern=HOST_ID_PATTERN,
        description="letters, digits, '.', '_' and '-', 1-64 characters",
    ),
]
Label = Annotated[str, msgspec.Meta(pattern=LABEL_PATTERN)]

Arch = Literal["x86_64", "i386", "aarch64", "ppc64le", "s390x", "riscv64"]


class VmWorkload(msgspec.Struct, frozen=True, kw_only=True):
    """What the sim engine should pretend the guest does; real engines ignore it."""

    cpu_util: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.2
    dirty_mib_s: Annotated[float, msgspec.Meta(ge=0.0, le=100_000.0)] = 4.0
    boot_s: Annotated[float, msgspec.Meta(ge=0.0, le=600.0)] = 0.0


#: Absolute host paths of images and kernels. Engines also confine them to their image directory.
HostPath = Annotated[str, msgspec.Meta(pattern=HOST_PATH_PATTERN, description="absolute path on the host")]
DiskTarget = Annotated[
    str, msgspec.Meta(pattern=DISK_TARGET_PATTERN, description="guest device name, e.g. vda")
]
MacAddress = Annotated[str, msgspec.Meta(pattern=MAC_PATTERN)]
Machine = Literal["pc", "q35", "microvm"]
CpuMode = Literal["default", "host-passthrough", "host-model", "custom"]
Feature = Literal["acpi", "apic", "pae"]


class BootSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Direct kernel boot when ``kernel`` is set; otherwise the first disk boots."""

    kernel: HostPath | None = None
    initrd: HostPath | None = None
    cmdline: Annotated[str, msgspec.Meta(max_length=4096)] = ""


class DiskSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A block device. With ``overlay`` (the default) the engine creates a qcow2 overlay on ``source``,
    so the base image is shared and never written; without it the file itself is the disk.

    A disk without an overlay opens read-only unless ``writable`` says otherwise: such a file is
    often an image other VMs share, and one guest must not be able to change it for all of them.
    ``writable: true`` is for an image this VM alone owns.

    Raises (decode, construction):
        ValueError: ``writable`` with ``readonly``, or with an overlay (an overlay is always writable).
    """

    target: DiskTarget
    source: HostPath
    format: Literal["qcow2", "raw"] = "qcow2"
    bus: Literal["virtio", "sata"] = "virtio"
    readonly: bool = False
    overlay: bool = True
    #: Open the file itself for writing (only without an overlay; the default opens it read-only).
    writable: bool = False

    def __post_init__(self) -> None:
        if self.writable and self.readonly:
            raise ValueError(f"disk {self.target}: writable and readonly contradict; keep one")
        if self.writable and self.overlay:
            raise ValueError(
                f"disk {self.target}: writable applies to a disk without an overlay (its overlay is "
                "always writable and its base never is); drop writable, or set overlay: false"
            )

    @property
    def guest_read_only(self) -> bool:
        """Whether the guest sees the disk read-only: ``readonly``, or the file itself unless writable."""
        return self.readonly or (not self.overlay and not self.writable)


class NicSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A network interface: user-mode networking by default, or a tap device / Linux bridge."""

    model: Literal["virtio", "e1000"] = "virtio"
    mode: Literal["user", "tap", "bridge"] = "user"
    mac: MacAddress | None = None
    #: Bridge name for mode=bridge, tap device name for mode=tap.
    device: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,15}\Z")] | None = None


class VmSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A virtual machine as the operator defines it.

    Unknown fields are ignored on the wire, so an older agent still runs a spec from a newer
    controller; operator input goes through :class:`VmSpecInput`, which refuses them.
    """

    name: VmName
    vcpus: Annotated[int, msgspec.Meta(ge=1, le=512)] = 1
    memory_mib: Annotated[int, msgspec.Meta(ge=16, le=16 * 1024 * 1024)] = 512
    disk_gib: Annotated[int, msgspec.Meta(ge=0, le=1024 * 1024)] = 0
    arch: Arch = "x86_64"
    labels: dict[Label, Annotated[str, msgspec.Meta(max_length=256)]] = {}
    workload: VmWorkload = VmWorkload()
    # -- devices (engines that model no devices, like sim, ignore them) -----------------------
    machine: Machine = "pc"
    cpu_mode: CpuMode = "default"
    #: CPU model for cpu_mode=custom (a QEMU/libvirt model name such as "Skylake-Server").
    cpu_model: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{0,64}\Z")] = ""
    #: Guest memory at boot when lower than ``memory_mib`` (the balloon target); None means all of it.
    current_memory_mib: Annotated[int, msgspec.Meta(ge=16, le=16 * 1024 * 1024)] | None = None
    boot: BootSpec = BootSpec()
    disks: list[DiskSpec] = []
    nics: list[NicSpec] = []
    features: list[Feature] = msgspec.field(default_factory=lambda: ["acpi", "apic"])
    #: A virtio console and a serial port whose output the engine keeps in a log file.
    console: bool = True
    rng: bool = True
    balloon: bool = True
    # -- high availability ---------------------------------------------------------------------
    #: Restart this VM on another host when its host fails (after the host is fenced).
    ha: bool = False
    #: Higher restarts first when capacity is short.
    ha_priority: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0


class VmSpecInput(VmSpec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A VM spec typed by a person (API body, CLI file): a misspelt field is an error, not ignored."""

    def to_spec(self) -> VmSpec:
        return msgspec.convert(msgspec.to_builtins(self), VmSpec)


_PATTERN_HINTS = {
    VM_NAME_PATTERN: "a VM name: 1-63 letters, digits, '.', '_' and '-', starting and ending with a letter or digit",
    HOST_ID_PATTERN: "a host id: letters, digits, '.', '_' and '-', up to 64 characters",
    HOST_PATH_PATTERN: "an absolute path on the host, e.g. /var/lib/fleetvisor/images/base.qcow2",
    DISK_TARGET_PATTERN: "a guest disk name such as vda or sdb",
    MAC_PATTERN: "a lower-case MAC address such as 52:54:00:12:34:56",
}


def explain_validation_error(error: msgspec.ValidationError) -> str:
    """Msgspec's message, with regular expressions replaced by what a person should type."""
    text = str(error)
    for pattern, hint in _PATTERN_HINTS.items():
        text = text.replace(f"Expected `str` matching regex {pattern!r}", f"Expected {hint}")
    return text


def vm_name_problem(name: str) -> str | None:
    """Return why ``name`` is not a valid VM name, or None when it is."""
    if VM_NAME_RE.fullmatch(name):
        return None
    return (
        f"vm name {name!r} is invalid: use 1-63 letters, digits, '.', '_' and '-', "
        "starting and ending with a letter or digit"
    )
