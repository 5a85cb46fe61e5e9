"""Domain XML export: :func:`spec_to_xml` writes a VM spec as a libvirt domain document.

Export writes every field, so ``spec_from_xml(spec_to_xml(spec)) == spec`` for every valid spec;
the few valid specs with no faithful XML form are refused first (:func:`_export_problems`). The
output comes from :class:`_Out`, a tiny serializer of our own, so it is exact and deterministic.

It imports only the stdlib, msgspec and protocols modules; protocols imports nothing of ours
outside protocols.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import msgspec

from protocols import vmspec
from protocols.domxml import vocabulary
from protocols.domxml.errors import DomainXmlError
from protocols.domxml.vocabulary import FLEETVISOR_NS, FLEETVISOR_PREFIX

#: Characters XML 1.0 cannot carry at all, not even as character references.
_NOT_XML_RE: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
#: ``NicSpec.mode`` → ``<interface type>``.
_INTERFACE_TYPES: Final = {mode: kind for kind, mode in vocabulary.NIC_MODES.items()}


def spec_to_xml(spec: vmspec.VmSpec) -> str:
    """The libvirt domain XML of ``spec``: indented, deterministic, ending in a newline.

    Equal specs give identical text, and :func:`~protocols.domxml.reader.spec_from_xml` reads it
    back to an equal spec. Raises :class:`DomainXmlError` when ``spec`` is not valid, or is one of
    the few valid specs with no faithful XML form (see ``docs/domxml.md``).
    """
    problems = _export_problems(spec)
    if problems:
        raise DomainXmlError(f"vm {spec.name!r} cannot be written as domain XML", problems)
    domain = _Out("domain", [("type", "kvm")])
    domain.add("name", text=spec.name)
    metadata = _fleetvisor_metadata(spec)
    if metadata is not None:
        domain.add("metadata").children.append(metadata)
    domain.add("memory", ("unit", "MiB"), text=str(spec.memory_mib))
    if spec.current_memory_mib is not None:
        domain.add("currentMemory", ("unit", "MiB"), text=str(spec.current_memory_mib))
    domain.add("vcpu", ("placement", "static"), text=str(spec.vcpus))
    _add_os(domain, spec)
    if spec.features:
        features = domain.add("features")
        for feature in spec.features:
            features.add(feature)
    if spec.cpu_mode != "default":
        cpu = domain.add("cpu", ("mode", spec.cpu_mode))
        if spec.cpu_model:
            cpu.add("model", text=spec.cpu_model)
    for event, action in vocabulary.LIFECYCLE_DEFAULTS.items():
        domain.add(event, text=action)
    _add_devices(domain.add("devices"), spec)
    lines: list[str] = []
    domain.write(lines, 0)
    return "\n".join(lines) + "\n"


def _export_problems(spec: vmspec.VmSpec) -> list[str]:
    """What keeps ``spec`` from being written faithfully, each as ``"<where>: <reason>; <fix>"``."""
    try:
        msgspec.convert(msgspec.to_builtins(spec), vmspec.VmSpecInput)
    except msgspec.ValidationError as exc:
        return [f"spec: invalid: {vmspec.explain_validation_error(exc)}; fix the spec first"]
    problems: list[str] = []
    targets = Counter(disk.target for disk in spec.disks)
    problems += [
        f"disks: {count} disks use target {target!r}; give each disk its own target"
        for target, count in targets.items()
        if count > 1
    ]
    problems += [
        f"features: {feature!r} is listed {count} times; list it once"
        for feature, count in Counter(spec.features).items()
        if count > 1
    ]
    if spec.cpu_mode == "default" and spec.cpu_model:
        problems.append(
            f"cpu_model: {spec.cpu_model!r} is set but cpu_mode is 'default', which libvirt cannot express; "
            "set cpu_mode='custom', or clear cpu_model"
        )
    return problems + _text_problems(spec)


def _text_problems(spec: vmspec.VmSpec) -> list[str]:
    """The spec's texts that hold a character XML 1.0 cannot carry."""
    texts = [
        ("boot.kernel", spec.boot.kernel),
        ("boot.initrd", spec.boot.initrd),
        ("boot.cmdline", spec.boot.cmdline),
        *((f"disks[{index}].source", disk.source) for index, disk in enumerate(spec.disks)),
        *((f"labels[{key!r}]", value) for key, value in spec.labels.items()),
    ]
    problems: list[str] = []
    for where, text in texts:
        bad = _NOT_XML_RE.search(text or "")
        if bad:
            problems.append(
                f"{where}: holds the character U+{ord(bad.group()):04X}, which XML 1.0 cannot carry; "
                "remove control characters other than tab and newline"
            )
    return problems


def _fleetvisor_metadata(spec: vmspec.VmSpec) -> _Out | None:
    """Fleetvisor's ``<metadata>`` element, or None when every field it holds has its default."""
    vm = _Out(f"{FLEETVISOR_PREFIX}:vm", [(f"xmlns:{FLEETVISOR_PREFIX}", FLEETVISOR_NS)])
    if spec.labels:
        labels = vm.add(f"{FLEETVISOR_PREFIX}:labels")
        for key, value in sorted(spec.labels.items()):
            labels.add(f"{FLEETVISOR_PREFIX}:label", ("key", key), ("value", value))
    if spec.workload != vmspec.VmWorkload():
        attrs = [
            (f.name, repr(getattr(spec.workload, f.name))) for f in msgspec.structs.fields(spec.workload)
        ]
        vm.add(f"{FLEETVISOR_PREFIX}:workload", *attrs)
    if spec.disk_gib:
        vm.add(f"{FLEETVISOR_PREFIX}:disk_gib", text=str(spec.disk_gib))
    if spec.ha or spec.ha_priority:
        enabled = "yes" if spec.ha else "no"
        vm.add(f"{FLEETVISOR_PREFIX}:ha", ("enabled", enabled), ("priority", str(spec.ha_priority)))
    for disk in spec.disks:
        if not disk.overlay:
            writable = (("writable", "yes"),) if disk.writable else ()
            vm.add(f"{FLEETVISOR_PREFIX}:disk", ("target", disk.target), ("overlay", "no"), *writable)
    return vm if vm.children else None


def _add_os(domain: _Out, spec: vmspec.VmSpec) -> None:
    os = domain.add("os")
    arch = vocabulary.ARCH_TO_LIBVIRT.get(spec.arch, spec.arch)
    os.add("type", ("arch", arch), ("machine", spec.machine), text="hvm")
    for key in ("kernel", "initrd", "cmdline"):
        value = getattr(spec.boot, key)
        if value:
            os.add(key, text=value)
    if spec.boot.kernel is None:
        os.add("boot", ("dev", "hd"))


def _add_devices(devices: _Out, spec: vmspec.VmSpec) -> None:
    for disk in spec.disks:
        _add_disk(devices, disk)
    for nic in spec.nics:
        _add_nic(devices, nic)
    if spec.console:
        devices.add("serial", ("type", "pty")).add("target", ("port", "0"))
        devices.add("console", ("type", "pty")).add("target", ("type", "virtio"), ("port", "0"))
    if spec.rng:
        devices.add("rng", ("model", "virtio")).add(
            "backend", ("model", "random"), text=vocabulary.RNG_SOURCE
        )
    devices.add("memballoon", ("model", "virtio" if spec.balloon else "none"))


def _add_disk(devices: _Out, disk: vmspec.DiskSpec) -> None:
    element = devices.add("disk", ("type", "file"), ("device", "disk"))
    element.add("driver", ("name", "qemu"), ("type", disk.format))
    element.add("source", ("file", disk.source))
    element.add("target", ("dev", disk.target), ("bus", disk.bus))
    if disk.readonly:
        element.add("readonly")


def _add_nic(devices: _Out, nic: vmspec.NicSpec) -> None:
    element = devices.add("interface", ("type", _INTERFACE_TYPES[nic.mode]))
    if nic.mac is not None:
        element.add("mac", ("address", nic.mac))
    if nic.device is not None:
        if nic.mode == "bridge":
            element.add("source", ("bridge", nic.device))
        else:
            element.add("target", ("dev", nic.device))
    element.add("model", ("type", nic.model))


_TEXT_ESCAPES: Final = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
#: Attribute values also escape quotes and the whitespace a parser would otherwise turn into spaces.
_ATTR_ESCAPES: Final = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "'": "&apos;",
        '"': "&quot;",
        "\t": "&#9;",
        "\n": "&#10;",
        "\r": "&#13;",
    }
)


@dataclass
class _Out:
    r"""An element to write. A tiny serializer of our own keeps the output exact: libvirt's quoting
    style, a fixed prefix for our namespace, and escapes ElementTree does not make (``\r`` in text).
    """

    tag: str
    attrs: list[tuple[str, str]] = field(default_factory=list)
    text: str | None = None
    children: list[_Out] = field(default_factory=list)

    def add(self, tag: str, *attrs: tuple[str, str], text: str | None = None) -> _Out:
        child = _Out(tag, list(attrs), text)
        self.children.append(child)
        return child

    def write(self, lines: list[str], depth: int) -> None:
        indent = "  " * depth
        start = self.tag + "".join(
            f" {name}='{value.translate(_ATTR_ESCAPES)}'" for name, value in self.attrs
        )
        if self.children:
            lines.append(f"{indent}<{start}>")
            for child in self.children:
                child.write(lines, depth + 1)
            lines.append(f"{indent}</{self.tag}>")
        elif self.text:
            lines.append(f"{indent}<{start}>{self.text.translate(_TEXT_ESCAPES)}</{self.tag}>")
        else:
            lines.append(f"{indent}<{start}/>")
