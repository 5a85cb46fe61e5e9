"""The libvirt domain XML vocabulary Fleetvisor reads and writes, as data.

:data:`ELEMENTS` is the mapping table, one row per element in document order: where the element
sits, the attributes it may carry and their accepted values, the children it may hold, the
:class:`~protocols.vmspec.VmSpec` field it fills, and what to do when it is missing. The tables
after it give the values that are translated (memory units, architectures, machine types) and, for
what is refused, the fix a person is told. ``docs/domxml.md`` explains the same table in prose.

The reader and the writer take their rules from here, so this table is what import accepts. It
imports only :mod:`protocols.vmspec`; protocols modules import nothing of ours outside protocols.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from protocols import vmspec

#: Namespace of Fleetvisor's element in ``<metadata>``, and the prefix export writes for it.
FLEETVISOR_NS: Final = "https://fleetvisor.dev/xmlns/1"
FLEETVISOR_PREFIX: Final = "fleetvisor"

#: Attribute rules: name → accepted values, or None for any value (checked against the spec field).
Rules = Mapping[str, Sequence[str] | None]


@dataclass(frozen=True)
class Element:
    """One element import accepts: its rules, the spec field it fills, and the fix when missing."""

    #: Where it sits, e.g. ``/domain/devices/disk/target``; Fleetvisor's own elements use its prefix.
    path: str
    #: The spec field(s) it fills; "" when it is accepted because it restates a default.
    maps_to: str = ""
    attributes: Rules = field(default_factory=dict)
    #: Attributes that must be present.
    required: tuple[str, ...] = ()
    #: Child elements it may hold; any other child is refused.
    children: tuple[str, ...] = ()
    #: Children that may appear more than once.
    repeatable: tuple[str, ...] = ()
    #: Fix for a child not in ``children``, when the general one (:data:`ELEMENT_FIXES`) does not fit.
    unknown_fix: str | None = None
    #: Fix when a required element is absent, and why it is required; "" when it is optional.
    missing_fix: str = ""
    missing_because: str = ""
    #: Why an element that is recognised is still refused; "" when it is accepted.
    refused: str = ""
    note: str = ""


# -- values that are translated -------------------------------------------------------------------

#: Bytes per unit, as libvirt's "Memory Allocation" section defines them.
MEMORY_UNITS: Final[Mapping[str, int]] = {
    "b": 1,
    "bytes": 1,
    "KB": 1000,
    "k": 1024,
    "KiB": 1024,
    "MB": 1000**2,
    "M": 1024**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "G": 1024**3,
    "GiB": 1024**3,
    "TB": 1000**4,
    "T": 1024**4,
    "TiB": 1024**4,
}
#: libvirt's unit for a size without ``unit``.
DEFAULT_MEMORY_UNIT: Final = "KiB"

#: libvirt architecture names that differ from ours.
ARCH_FROM_LIBVIRT: Final[Mapping[str, str]] = {"i686": "i386"}
ARCH_TO_LIBVIRT: Final[Mapping[str, str]] = {ours: theirs for theirs, ours in ARCH_FROM_LIBVIRT.items()}
ARCHES: Final = tuple(typing.get_args(vmspec.Arch))
LIBVIRT_ARCHES: Final = tuple(ARCH_TO_LIBVIRT.get(arch, arch) for arch in ARCHES)

MACHINES: Final = tuple(typing.get_args(vmspec.Machine))
#: Versioned QEMU machine types and the family they belong to (pc-i440fx-7.2, pc-q35-rhel9.2.0).
VERSIONED_MACHINES: Final = (
    (re.compile(r"pc-i440fx-[A-Za-z0-9._-]+"), "pc"),
    (re.compile(r"pc-q35-[A-Za-z0-9._-]+"), "q35"),
)
FEATURES: Final = tuple(typing.get_args(vmspec.Feature))
CPU_MODES: Final = ("host-passthrough", "host-model", "custom")
#: libvirt's CPU mode when ``<cpu>`` has no ``mode``.
DEFAULT_CPU_MODE: Final = "custom"
#: What libvirt does on each lifecycle event when not told otherwise, which is what Fleetvisor does.
LIFECYCLE_DEFAULTS: Final[Mapping[str, str]] = {
    "on_poweroff": "destroy",
    "on_reboot": "restart",
    "on_crash": "destroy",
}
RNG_SOURCE: Final = "/dev/urandom"
#: ``<interface type>`` → ``NicSpec.mode``.
NIC_MODES: Final[Mapping[str, str]] = {"user": "user", "bridge": "bridge", "ethernet": "tap"}
WORKLOAD_FIELDS: Final = tuple(spec_field.name for spec_field in msgspec.structs.fields(vmspec.VmWorkload))


def _fv(local: str) -> str:
    return f"{FLEETVISOR_PREFIX}:{local}"


_METADATA = "/domain/metadata"
_VM = f"{_METADATA}/{_fv('vm')}"
_CONSOLE_SOURCE_REFUSED = "not supported (Fleetvisor writes console output to its own log file)"

# -- the mapping table ----------------------------------------------------------------------------

#: Every element import accepts, in document order.
ELEMENTS: Final[tuple[Element, ...]] = (
    Element(
        "/domain",
        attributes={"type": ("kvm", "qemu"), "id": None},
        required=("type",),
        children=(
            "name",
            "uuid",
            "memory",
            "currentMemory",
            "vcpu",
            "os",
            "cpu",
            "features",
            "devices",
            "metadata",
            *LIFECYCLE_DEFAULTS,
        ),
        note="the engine decides acceleration, so type is not kept (export writes kvm); "
        "id, a running domain's number, is accepted and not kept",
    ),
    Element("/domain/name", "name", missing_fix="add <name>web-1</name>"),
    Element(
        "/domain/uuid",
        note="checked for form, not kept: Fleetvisor names VMs, and libvirt makes a new uuid on define",
    ),
    Element(
        "/domain/memory",
        "memory_mib",
        attributes={"unit": None},
        missing_fix="add <memory unit='MiB'>512</memory>",
        note="unit from MEMORY_UNITS, default KiB; rounded up to a whole MiB",
    ),
    Element(
        "/domain/currentMemory",
        "current_memory_mib",
        attributes={"unit": None},
        note="as <memory>; kept as given, even when it equals <memory>",
    ),
    Element("/domain/vcpu", "vcpus", attributes={"placement": ("static",)}, note="missing means 1"),
    Element(
        "/domain/os",
        children=("type", "kernel", "initrd", "cmdline", "boot"),
        missing_fix="add <os><type arch='x86_64' machine='pc'>hvm</type></os>",
    ),
    Element(
        "/domain/os/type",
        "arch, machine",
        attributes={"arch": None, "machine": None},
        missing_fix="add <type arch='x86_64' machine='pc'>hvm</type>",
        note="text hvm; arch from LIBVIRT_ARCHES (missing: x86_64), machine from MACHINES or "
        "VERSIONED_MACHINES (missing: pc)",
    ),
    Element("/domain/os/kernel", "boot.kernel"),
    Element("/domain/os/initrd", "boot.initrd"),
    Element("/domain/os/cmdline", "boot.cmdline"),
    Element(
        "/domain/os/boot",
        attributes={"dev": ("hd",)},
        required=("dev",),
        note="disk boot, what Fleetvisor does without a kernel",
    ),
    Element(
        "/domain/cpu",
        "cpu_mode",
        attributes={"mode": CPU_MODES, "match": ("exact",), "check": ("none",), "migratable": ("on",)},
        children=("model",),
        note="no <cpu> means cpu_mode 'default'; no mode means custom, as in libvirt",
    ),
    Element("/domain/cpu/model", "cpu_model", attributes={"fallback": ("allow",)}),
    Element(
        "/domain/features",
        "features",
        children=FEATURES,
        unknown_fix=f"remove it; Fleetvisor supports {', '.join(FEATURES)}",
        note="in document order; a feature not listed is off, as in libvirt",
    ),
    *(Element(f"/domain/features/{feature}", "features") for feature in FEATURES),
    *(
        Element(f"/domain/{event}", note=f"only {action}, the libvirt default, which Fleetvisor does")
        for event, action in LIFECYCLE_DEFAULTS.items()
    ),
    Element(
        "/domain/devices",
        children=("disk", "interface", "serial", "console", "rng", "memballoon"),
        repeatable=("disk", "interface"),
    ),
    Element(
        "/domain/devices/disk",
        "disks",
        attributes={"type": ("file",), "device": ("disk",)},
        required=("type",),
        children=("driver", "source", "target", "readonly"),
    ),
    Element(
        "/domain/devices/disk/driver",
        "disks[].format",
        attributes={"name": ("qemu",), "type": ("qcow2", "raw")},
        required=("type",),
        missing_fix="add <driver name='qemu' type='qcow2'/> or type='raw'",
        missing_because=" (libvirt would then read the image as raw)",
    ),
    Element(
        "/domain/devices/disk/source",
        "disks[].source",
        attributes={"file": None},
        required=("file",),
        missing_fix="add <source file='/var/lib/fleetvisor/images/base.qcow2'/>",
    ),
    Element(
        "/domain/devices/disk/target",
        "disks[].target, disks[].bus",
        attributes={"dev": None, "bus": ("virtio", "sata")},
        required=("dev",),
        missing_fix="add <target dev='vda' bus='virtio'/>",
        note="without bus, a vd* name means virtio (as libvirt infers); any other name needs a bus",
    ),
    Element("/domain/devices/disk/readonly", "disks[].readonly"),
    Element(
        "/domain/devices/interface",
        "nics[].mode",
        attributes={"type": tuple(NIC_MODES)},
        required=("type",),
        children=("mac", "model", "source", "target"),
        note="<source bridge> with type bridge, <target dev> (the tap) with the others",
    ),
    Element(
        "/domain/devices/interface/mac",
        "nics[].mac",
        attributes={"address": None},
        required=("address",),
        note="read case-insensitively, kept lower-case",
    ),
    Element(
        "/domain/devices/interface/model",
        "nics[].model",
        attributes={"type": ("virtio", "e1000")},
        required=("type",),
        missing_fix="add <model type='virtio'/> or <model type='e1000'/>",
        missing_because=" (libvirt's default NIC model is not one Fleetvisor has)",
    ),
    Element(
        "/domain/devices/interface/source",
        "nics[].device",
        attributes={"bridge": None},
        required=("bridge",),
    ),
    Element("/domain/devices/interface/target", "nics[].device", attributes={"dev": None}, required=("dev",)),
    Element(
        "/domain/devices/serial",
        "console",
        attributes={"type": ("pty", "file")},
        required=("type",),
        children=("target", "source"),
    ),
    Element("/domain/devices/serial/target", attributes={"port": ("0",)}),
    Element("/domain/devices/serial/source", refused=_CONSOLE_SOURCE_REFUSED),
    Element(
        "/domain/devices/console",
        "console",
        attributes={"type": ("pty", "file")},
        required=("type",),
        children=("target", "source"),
    ),
    Element("/domain/devices/console/target", attributes={"type": ("serial", "virtio"), "port": ("0",)}),
    Element("/domain/devices/console/source", refused=_CONSOLE_SOURCE_REFUSED),
    Element(
        "/domain/devices/rng",
        "rng",
        attributes={"model": ("virtio",)},
        required=("model",),
        children=("backend",),
    ),
    Element(
        "/domain/devices/rng/backend",
        attributes={"model": ("random",)},
        required=("model",),
        missing_fix=f"add <backend model='random'>{RNG_SOURCE}</backend>",
        note=f"text {RNG_SOURCE}, or none",
    ),
    Element(
        "/domain/devices/memballoon",
        "balloon",
        attributes={"model": ("virtio", "none")},
        required=("model",),
        note="missing means virtio, as libvirt adds one by default",
    ),
    Element(
        _METADATA,
        children=(_fv("vm"),),
        unknown_fix=(
            "remove it; Fleetvisor keeps only its own element here, "
            f"<fleetvisor:vm xmlns:fleetvisor='{FLEETVISOR_NS}'>"
        ),
        note="libvirt allows one top-level element per namespace",
    ),
    Element(
        _VM,
        children=(_fv("labels"), _fv("workload"), _fv("disk_gib"), _fv("ha"), _fv("disk")),
        repeatable=(_fv("disk"),),
        note="what libvirt has no element for; export writes only what differs from the defaults",
    ),
    Element(f"{_VM}/{_fv('labels')}", "labels", children=(_fv("label"),), repeatable=(_fv("label"),)),
    Element(
        f"{_VM}/{_fv('labels')}/{_fv('label')}",
        "labels",
        attributes={"key": None, "value": None},
        required=("key", "value"),
    ),
    Element(f"{_VM}/{_fv('workload')}", "workload", attributes=dict.fromkeys(WORKLOAD_FIELDS)),
    Element(f"{_VM}/{_fv('disk_gib')}", "disk_gib"),
    Element(f"{_VM}/{_fv('ha')}", "ha, ha_priority", attributes={"enabled": ("yes", "no"), "priority": None}),
    Element(
        f"{_VM}/{_fv('disk')}",
        "disks[].overlay, disks[].writable",
        attributes={"target": None, "overlay": ("yes", "no"), "writable": ("yes", "no")},
        required=("target", "overlay"),
        note="one per disk whose overlay differs from the default, named by its target; "
        "writable='yes' lets the guest write an image it uses without an overlay",
    ),
)
#: :data:`ELEMENTS` by path.
BY_PATH: Final[Mapping[str, Element]] = {element.path: element for element in ELEMENTS}

# -- what is refused, and the fix a person is told ------------------------------------------------

_HEADLESS: Final = "remove it; Fleetvisor VMs are headless, use the serial console (<serial type='pty'/>)"
#: How to fix an element Fleetvisor does not support, by tag; anything else gets "remove it".
ELEMENT_FIXES: Final[Mapping[str, str]] = {
    "hostdev": "remove it; Fleetvisor does not pass host devices through to guests",
    "graphics": _HEADLESS,
    "video": _HEADLESS,
    "input": _HEADLESS,
    "sound": _HEADLESS,
    "audio": _HEADLESS,
    "controller": "remove it; the engine adds the controllers the disks and NICs need",
    "address": "remove it; the engine assigns device addresses",
    "alias": "remove it; the engine names devices itself",
    "emulator": "remove it; the engine picks the QEMU binary for the guest architecture",
    "channel": "remove it; for a guest console use <console type='pty'><target type='virtio'/></console>",
    "filesystem": "remove it, or give the guest a <disk type='file' device='disk'> image instead",
    "loader": "remove it; the spec has no firmware setting: the first disk boots, or <os><kernel>",
    "nvram": "remove it; the spec has no firmware setting: the first disk boots, or <os><kernel>",
    "title": "remove it, or keep the text as a <fleetvisor:label> in <metadata>",
    "description": "remove it, or keep the text as a <fleetvisor:label> in <metadata>",
    "maxMemory": "remove it; memory hotplug is not supported, size the guest with <memory>",
    "topology": "remove it; the spec has only a vCPU count, set it with <vcpu>",
    "boot": "remove it; the first disk boots, or the kernel in <os><kernel>",
}
#: Example values for required attributes, by (element tag, attribute).
EXAMPLES: Final[Mapping[tuple[str, str], str]] = {
    ("source", "file"): "/var/lib/fleetvisor/images/base.qcow2",
    ("source", "bridge"): "br0",
    ("target", "dev"): "vda",
    ("mac", "address"): "52:54:00:12:34:56",
    ("fleetvisor:label", "key"): "team",
    ("fleetvisor:label", "value"): "web",
    ("fleetvisor:disk", "target"): "vda",
}
#: How to fix a refused attribute value, by (element tag, attribute).
VALUE_FIXES: Final[Mapping[tuple[str, str], str]] = {
    ("domain", "type"): "use type='kvm' (or 'qemu'); Fleetvisor runs QEMU guests only",
    ("disk", "type"): "use type='file' with a disk image file; block devices, volumes and network disks "
    "are not supported",
    ("disk", "device"): "use device='disk'; cdrom, floppy and lun devices are not supported",
    ("interface", "type"): "use type='user', type='bridge' with <source bridge='br0'/> (for a libvirt "
    "network, its bridge, e.g. virbr0), or type='ethernet' with <target dev='tap0'/>",
    ("vcpu", "placement"): "use placement='static' or remove it; Fleetvisor does not place vCPUs with numad",
    ("boot", "dev"): "use dev='hd', or remove <boot>; Fleetvisor boots from the first disk",
    ("cpu", "mode"): "use mode='host-passthrough', 'host-model' or 'custom' (maximum is host-passthrough "
    "on KVM)",
    ("cpu", "check"): "remove it; Fleetvisor leaves the CPU check to QEMU, as check='none' does",
    ("cpu", "match"): "remove it; only the default match='exact' is supported",
    ("cpu", "migratable"): "remove it; only the default migratable='on' is supported",
    ("model", "fallback"): "remove it; only the default fallback='allow' is supported",
    ("serial", "type"): "use type='pty'; Fleetvisor keeps console output in its own log file",
    ("console", "type"): "use type='pty'; Fleetvisor keeps console output in its own log file",
    ("rng", "model"): "use model='virtio'",
    ("backend", "model"): "use model='random'; Fleetvisor's rng reads /dev/urandom",
    ("memballoon", "model"): "use model='virtio', or model='none' for no balloon",
    ("driver", "name"): "use name='qemu'",
}
