"""libvirt domain XML import and export for the VM spec.

Operators often have a VM already described as libvirt domain XML (``virsh dumpxml``,
virt-install output). :func:`spec_from_xml` turns the part of that format Fleetvisor can run into a
:class:`~protocols.vmspec.VmSpec`, and :func:`spec_to_xml` writes a spec back out, so a VM can move
between Fleetvisor and libvirt. Both are pure: no I/O, no libvirt, stdlib ElementTree only.

Import is strict. Every element and attribute of the input is either mapped to a spec field,
accepted because it only restates what Fleetvisor does anyway (the libvirt defaults listed below),
or refused. Nothing is dropped silently. All problems in a document are collected and reported
together in one :class:`DomainXmlError`, each naming the element or attribute
(``/domain/devices/disk[2]/@type='block'``), the reason and the fix.

What maps (libvirt's formatdomain documentation and domain RelaxNG schema are the reference):

- ``<domain type='kvm'|'qemu'>``: both accepted; the engine decides acceleration, so the type is
  not kept and export writes ``kvm``. ``id`` (a running domain's number) is accepted and not kept.
- ``<name>`` → ``name``. ``<uuid>`` is checked for form and not kept: Fleetvisor names VMs, it does
  not number them, and libvirt makes a new uuid when the exported XML is defined.
- ``<memory>``/``<currentMemory>`` with ``unit`` (b, bytes, KB, k, KiB, MB, M, MiB, GB, G, GiB, TB,
  T, TiB; default KiB) → ``memory_mib``/``current_memory_mib``. Sizes are converted with integer
  arithmetic and **rounded up** to a whole MiB, as libvirt itself rounds up to the hypervisor's
  granularity. ``currentMemory`` is kept as given, even when it equals ``memory``.
- ``<vcpu placement='static'>`` → ``vcpus`` (missing → 1, as in libvirt).
- ``<os>``: ``<type arch=.. machine=..>hvm</type>``; arch ``i686`` → ``i386``, others by name
  (missing → ``x86_64``); machine ``pc``/``q35``/``microvm``, and versioned names
  (``pc-i440fx-7.2`` → ``pc``, ``pc-q35-7.2`` → ``q35``; the version is not kept, the engine uses
  its current one; missing → ``pc``). ``<kernel>``, ``<initrd>``, ``<cmdline>`` → ``boot``.
  ``<boot dev='hd'/>`` (disk boot, what Fleetvisor does without a kernel) is accepted.
- ``<cpu>``: no element → ``default``; ``mode`` host-passthrough, host-model, custom (also when
  ``mode`` is missing) → ``cpu_mode``; ``<model>`` → ``cpu_model``. Only the libvirt defaults
  ``match='exact'``, ``check='none'``, ``migratable='on'`` and ``fallback='allow'`` are accepted.
- ``<features>`` with ``<acpi/>``, ``<apic/>``, ``<pae/>`` → ``features`` in document order; as in
  libvirt, a missing feature is off, so no ``<features>`` means none.
- ``<on_poweroff>destroy``, ``<on_reboot>restart``, ``<on_crash>destroy``: the libvirt defaults,
  which are what Fleetvisor does; any other action is refused.
- ``<devices>``: ``<disk type='file' device='disk'>`` with ``<driver name='qemu' type='qcow2'|'raw'>``
  (required: libvirt's own default would be raw), ``<source file>``, ``<target dev bus='virtio'|
  'sata'>`` and ``<readonly/>``; ``<interface type='user'|'bridge'|'ethernet'>`` with ``<mac>``,
  ``<model type='virtio'|'e1000'>`` (required: libvirt's default model is one Fleetvisor lacks),
  ``<source bridge>`` for bridge and ``<target dev>`` (the tap) otherwise; ``<serial>`` and
  ``<console>`` of type pty or file → ``console`` (Fleetvisor keeps the output in its own log file,
  so a ``<source path>`` is refused); ``<rng model='virtio'>`` with ``<backend
  model='random'>/dev/urandom`` → ``rng``; ``<memballoon model='virtio'|'none'>`` → ``balloon``
  (missing means virtio, as libvirt adds one by default).
- ``<metadata>``: one ``<fleetvisor:vm xmlns:fleetvisor="https://fleetvisor.dev/xmlns/1">``
  element (libvirt allows one top-level element per namespace) holding what libvirt has no
  element for: ``<fleetvisor:labels>`` of ``<fleetvisor:label key= value=/>``, ``<fleetvisor:workload
  cpu_util= dirty_mib_s= boot_s=/>``, ``<fleetvisor:disk_gib>``, ``<fleetvisor:ha enabled='yes'|'no'
  priority=/>`` and ``<fleetvisor:disk target= overlay='yes'|'no'/>`` per disk. Export writes only
  what differs from the defaults.

Export writes every field, so ``spec_from_xml(spec_to_xml(spec)) == spec`` for every valid spec.
A few specs VmSpec accepts have no faithful XML form, and :func:`spec_to_xml` refuses them with a
:class:`DomainXmlError` instead of writing something else: two disks with one target, a feature
listed twice, a ``cpu_model`` with ``cpu_mode='default'``, and text with characters XML 1.0 cannot
carry (control characters other than tab, newline and carriage return).

Everything else is refused, including what ``virsh dumpxml`` adds on its own (``<emulator>``,
``<controller>``, ``<address>``, ``<input>``, ``<graphics>``, ``<seclabel>``, ``check='partial'``):
the engine decides those, so such a document needs trimming, which the error message lists item
by item. XML comments and processing instructions carry no configuration and are skipped.

Hostile input: the text is capped at :data:`MAX_XML_BYTES`, and any DOCTYPE or ENTITY declaration
is refused before parsing, which rules out entity-expansion ("billion laughs") and external-entity
attacks without a defusedxml dependency.
"""

from __future__ import annotations

import re
import typing
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from protocols import vmspec

#: Largest document :func:`spec_from_xml` reads. A domain XML is a few KiB.
MAX_XML_BYTES: Final = 1024 * 1024
#: Namespace of Fleetvisor's element in ``<metadata>``.
FLEETVISOR_NS: Final = "https://fleetvisor.dev/xmlns/1"
FLEETVISOR_PREFIX: Final = "fleetvisor"

__all__ = ["FLEETVISOR_NS", "MAX_XML_BYTES", "DomainXmlError", "spec_from_xml", "spec_to_xml"]


class DomainXmlError(ValueError):
    """A domain XML document Fleetvisor cannot import, or a spec it cannot export faithfully.

    ``problems`` lists each problem on its own, as ``"<where>: <reason>; <fix>"``; the message
    lists them all.
    """

    def __init__(self, heading: str, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        if len(self.problems) == 1:
            message = f"{heading}: {self.problems[0]}"
        else:
            listed = "\n".join(f"  - {problem}" for problem in self.problems)
            message = f"{heading} ({len(self.problems)} problems):\n{listed}"
        super().__init__(message)


# -- shared tables --------------------------------------------------------------------------------

_MIB: Final = 1024 * 1024
#: Bytes per unit, as libvirt's "Memory Allocation" section defines them.
_MEMORY_UNITS: Final[Mapping[str, int]] = {
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
_UNIT_NAMES: Final = ", ".join(_MEMORY_UNITS)

#: libvirt architecture names that differ from ours.
_ARCH_FROM_LIBVIRT: Final[Mapping[str, str]] = {"i686": "i386"}
_ARCH_TO_LIBVIRT: Final[Mapping[str, str]] = {ours: theirs for theirs, ours in _ARCH_FROM_LIBVIRT.items()}
_ARCHES: Final = tuple(typing.get_args(vmspec.Arch))
_LIBVIRT_ARCHES: Final = tuple(_ARCH_TO_LIBVIRT.get(arch, arch) for arch in _ARCHES)

_MACHINES: Final = tuple(typing.get_args(vmspec.Machine))
#: Versioned QEMU machine types and the family they belong to (pc-i440fx-7.2, pc-q35-rhel9.2.0).
_VERSIONED_MACHINES: Final = (
    (re.compile(r"pc-i440fx-[A-Za-z0-9._-]+"), "pc"),
    (re.compile(r"pc-q35-[A-Za-z0-9._-]+"), "q35"),
)
_FEATURES: Final = tuple(typing.get_args(vmspec.Feature))
_CPU_MODES: Final = ("host-passthrough", "host-model", "custom")
#: What libvirt does on each lifecycle event when not told otherwise, which is what Fleetvisor does.
_LIFECYCLE_DEFAULTS: Final[Mapping[str, str]] = {
    "on_poweroff": "destroy",
    "on_reboot": "restart",
    "on_crash": "destroy",
}
_RNG_SOURCE: Final = "/dev/urandom"

_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}")
_WHOLE_NUMBER_RE: Final = re.compile(r"[0-9]{1,24}")
_DECIMAL_RE: Final = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")
_DECLARATION_RE: Final = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")
#: Characters XML 1.0 cannot carry at all, not even as character references.
_NOT_XML_RE: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_VM_TYPES: Final = typing.get_type_hints(vmspec.VmSpec, include_extras=True)
_DISK_TYPES: Final = typing.get_type_hints(vmspec.DiskSpec, include_extras=True)
_NIC_TYPES: Final = typing.get_type_hints(vmspec.NicSpec, include_extras=True)
_BOOT_TYPES: Final = typing.get_type_hints(vmspec.BootSpec, include_extras=True)
_WORKLOAD_TYPES: Final = typing.get_type_hints(vmspec.VmWorkload, include_extras=True)
_LABEL_KEY_TYPE, _LABEL_VALUE_TYPE = typing.get_args(_VM_TYPES["labels"])

_HEADLESS: Final = "remove it; Fleetvisor VMs are headless, use the serial console (<serial type='pty'/>)"
#: How to fix an element Fleetvisor does not support, by tag; anything else gets "remove it".
_ELEMENT_FIXES: Final[Mapping[str, str]] = {
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
_EXAMPLES: Final[Mapping[tuple[str, str], str]] = {
    ("source", "file"): "/var/lib/fleetvisor/images/base.qcow2",
    ("source", "bridge"): "br0",
    ("target", "dev"): "vda",
    ("mac", "address"): "52:54:00:12:34:56",
    ("fleetvisor:label", "key"): "team",
    ("fleetvisor:label", "value"): "web",
    ("fleetvisor:disk", "target"): "vda",
}
#: How to fix a refused attribute value, by (element tag, attribute).
_VALUE_FIXES: Final[Mapping[tuple[str, str], str]] = {
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


# -- import ---------------------------------------------------------------------------------------


def spec_from_xml(text: str) -> vmspec.VmSpec:
    """Build a VM spec from a libvirt domain XML document (the module docstring has the mapping).

    Raises :class:`DomainXmlError` listing every problem: input over :data:`MAX_XML_BYTES`, a
    DOCTYPE or ENTITY declaration, malformed XML (with line and column), each element or attribute
    that is not supported, and each value the spec refuses, named by the XML it came from.
    Raises TypeError when ``text`` is not a str (decode bytes first).
    """
    if not isinstance(text, str):
        raise TypeError(
            f"spec_from_xml takes the document as str, not {type(text).__name__}; decode it first"
        )
    heading = "domain XML refused"
    if len(text) > MAX_XML_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_XML_BYTES:
        raise DomainXmlError(
            heading,
            [
                f"input: larger than the {MAX_XML_BYTES // 1024} KiB limit; a domain XML is a few KiB, "
                "check that this is the right file"
            ],
        )
    declaration = _DECLARATION_RE.search(text)
    if declaration:
        raise DomainXmlError(
            heading,
            [
                f"line {_line_of(text, declaration.start())}: {declaration.group(1).upper()} declarations "
                "are refused (they allow entity-expansion and external-entity attacks); remove the "
                "<!DOCTYPE ...> block, domain XML needs none"
            ],
        )
    surrogate = _SURROGATE_RE.search(text)
    if surrogate:
        raise DomainXmlError(
            heading,
            [
                f"line {_line_of(text, surrogate.start())}: the text holds a lone surrogate "
                f"(U+{ord(surrogate.group()):04X}), which no XML document can; fix the text's encoding"
            ],
        )
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        line, column = exc.position
        reason = str(exc).split(":", 1)[0]
        raise DomainXmlError(
            heading, [f"line {line}, column {column + 1}: malformed XML ({reason}); fix the XML syntax"]
        ) from None
    reader = _Reader()
    data = reader.domain(root)
    if isinstance(data.get("name"), str):
        heading = f"domain XML for {data['name']!r} refused"
    if not reader.problems:
        try:
            return msgspec.convert(data, vmspec.VmSpecInput).to_spec()
        except msgspec.ValidationError as exc:
            # Each value was checked against its field's type already; this is only a backstop.
            reader.problems.append(f"/domain: {vmspec.explain_validation_error(exc)}; fix that value")
    raise DomainXmlError(heading, reader.problems)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _fv(local: str) -> str:
    """The ElementTree name of an element in Fleetvisor's namespace."""
    return f"{{{FLEETVISOR_NS}}}{local}"


def _readable(tag: str) -> str:
    """An element or attribute name as a person reads it: ``fleetvisor:vm``, or ``{ns}x`` for others."""
    prefix = f"{{{FLEETVISOR_NS}}}"
    return f"{FLEETVISOR_PREFIX}:{tag[len(prefix) :]}" if tag.startswith(prefix) else tag


def _shown(value: str) -> str:
    """A value quoted for a message, shortened when long."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _machine_family(machine: str) -> str | None:
    if machine in _MACHINES:
        return machine
    for pattern, family in _VERSIONED_MACHINES:
        if pattern.fullmatch(machine):
            return family
    return None


@dataclass(frozen=True)
class _Node:
    """An element with its path for messages, e.g. ``/domain/devices/disk[2]``."""

    el: ET.Element
    path: str

    @property
    def tag(self) -> str:
        return self.el.tag

    def attr_path(self, name: str) -> str:
        return f"{self.path}/@{_readable(name)}={_shown(self.el.attrib[name])}"


class _Invalid:
    """Marks a value that failed its check; the problem is already recorded."""


_INVALID: Final = _Invalid()
#: Attribute rules: name → accepted values, or None for any value (checked elsewhere).
_Rules = Mapping[str, Sequence[str] | None]


@dataclass
class _Reader:
    """Walks a domain element, collecting the spec's data and every problem on the way."""

    problems: list[str] = field(default_factory=list)

    # -- generic checks ---------------------------------------------------------------------------

    def problem(self, where: str, reason: str, fix: str) -> None:
        self.problems.append(f"{where}: {reason}; {fix}")

    def missing(self, node: _Node, what: str, fix: str, because: str = "") -> None:
        self.problem(node.path, f"{what} is missing{because}", fix)

    def attributes(
        self, node: _Node, rules: _Rules | None = None, required: Iterable[str] = ()
    ) -> dict[str, str]:
        """The accepted attributes of ``node``; every other one is a problem."""
        rules = rules or {}
        accepted: dict[str, str] = {}
        for name, value in node.el.attrib.items():
            if name not in rules:
                self.problem(node.attr_path(name), "not supported", "remove it")
                continue
            choices = rules[name]
            if choices is not None and value not in choices:
                default_fix = "use " + " or ".join(f"{name}={choice!r}" for choice in choices)
                fix = _VALUE_FIXES.get((_readable(node.tag), name), default_fix)
                self.problem(node.attr_path(name), "not supported", fix)
                continue
            accepted[name] = value
        for name in required:
            if name not in node.el.attrib:
                example = (rules.get(name) or [_EXAMPLES.get((_readable(node.tag), name), "...")])[0]
                self.missing(node, f"attribute {name!r}", f"add {name}={example!r}")
        return accepted

    def children(
        self,
        node: _Node,
        allowed: Iterable[str] = (),
        *,
        repeatable: Iterable[str] = (),
        unknown_fix: str | None = None,
    ) -> list[_Node]:
        """The accepted child elements of an element that holds elements only."""
        allowed, repeatable = set(allowed), set(repeatable)
        stray = [piece.strip() for piece in [node.el.text or "", *(child.tail or "" for child in node.el)]]
        if any(stray):
            self.problem(
                node.path, f"unexpected text {_shown(next(s for s in stray if s))}", "remove the text"
            )
        counts = Counter(child.tag for child in node.el)
        seen: Counter[str] = Counter()
        accepted: list[_Node] = []
        for child in node.el:
            seen[child.tag] += 1
            index = f"[{seen[child.tag]}]" if counts[child.tag] > 1 else ""
            child_node = _Node(child, f"{node.path}/{_readable(child.tag)}{index}")
            if child.tag not in allowed:
                fix = unknown_fix or _ELEMENT_FIXES.get(child.tag, "remove it")
                self.problem(child_node.path, "not supported", fix)
            elif seen[child.tag] > 1 and child.tag not in repeatable:
                self.problem(
                    child_node.path,
                    f"<{_readable(child.tag)}> may appear only once here",
                    "remove the extra one",
                )
            else:
                accepted.append(child_node)
        return accepted

    def singles(self, node: _Node, allowed: Iterable[str], **kwargs: Any) -> dict[str, _Node]:
        """Like :meth:`children`, for elements that may each appear once: by tag."""
        return {child.tag: child for child in self.children(node, allowed, **kwargs)}

    def empty(self, node: _Node, rules: _Rules | None = None, required: Iterable[str] = ()) -> dict[str, str]:
        """The accepted attributes of an element that must have no content."""
        self.children(node)
        return self.attributes(node, rules, required)

    def leaf(self, node: _Node, rules: _Rules | None = None) -> str:
        """The text of an element that holds text only ("" when empty); attributes per ``rules``."""
        self.attributes(node, rules)
        for child in node.el:
            self.problem(f"{node.path}/{_readable(child.tag)}", "not supported", "remove it")
        return node.el.text or ""

    def checked(self, where: str, value: Any, annotation: Any) -> Any:
        """``value`` converted to a spec field's type, or :data:`_INVALID` with the problem recorded."""
        if isinstance(value, _Invalid):
            return value
        try:
            return msgspec.convert(value, annotation)
        except msgspec.ValidationError as exc:
            reason = re.sub(r" - at `[^`]*`$", "", vmspec.explain_validation_error(exc))
            self.problems.append(f"{where}: invalid value: {reason}")
            return _INVALID

    def whole_number(self, where: str, text: str, what: str) -> int | _Invalid:
        if not _WHOLE_NUMBER_RE.fullmatch(text.strip()):
            self.problem(where, f"{_shown(text)} is not a whole number", f"write {what} in digits")
            return _INVALID
        return int(text.strip())

    @staticmethod
    def store(data: dict[str, Any], key: str, value: Any) -> None:
        if not isinstance(value, _Invalid):
            data[key] = value

    # -- the domain -------------------------------------------------------------------------------

    def domain(self, root: ET.Element) -> dict[str, Any]:
        node = _Node(root, f"/{_readable(root.tag)}")
        data: dict[str, Any] = {"features": [], "console": False, "rng": False, "balloon": True}
        if root.tag != "domain":
            self.problem(node.path, "not a libvirt domain document", "give a <domain type='kvm'> document")
            return data
        self.attributes(node, {"type": ("kvm", "qemu"), "id": None}, required=["type"])
        if "id" in root.attrib and not root.attrib["id"].lstrip("-").isdigit():
            self.problem(
                node.attr_path("id"), "not a domain id", "remove it (a running domain's id is not kept)"
            )
        allowed = {"name", "uuid", "memory", "currentMemory", "vcpu", "os", "cpu", "features", "devices"}
        found = self.singles(node, allowed | {"metadata"} | set(_LIFECYCLE_DEFAULTS))
        if "name" in found:
            name = self.leaf(found["name"]).strip()
            self.store(data, "name", self.checked(found["name"].path, name, _VM_TYPES["name"]))
        else:
            self.missing(node, "<name>", "add <name>web-1</name>")
        if "uuid" in found:
            uuid = self.leaf(found["uuid"]).strip()
            if not _UUID_RE.fullmatch(uuid):
                self.problem(
                    found["uuid"].path,
                    f"{_shown(uuid)} is not a UUID",
                    "write one like 4dea22b3-1d52-d8f3-2516-782e98ab3fa0, or remove it (it is not kept)",
                )
        if "memory" not in found:
            self.missing(node, "<memory>", "add <memory unit='MiB'>512</memory>")
        for tag, key in (("memory", "memory_mib"), ("currentMemory", "current_memory_mib")):
            if tag in found:
                mib = self.memory_mib(found[tag])
                where = f"{found[tag].path} (= {mib} MiB)" if isinstance(mib, int) else found[tag].path
                self.store(data, key, self.checked(where, mib, _VM_TYPES[key]))
        if "vcpu" in found:
            vcpu_node = found["vcpu"]
            text = self.leaf(vcpu_node, {"placement": ("static",)})
            vcpus = self.whole_number(vcpu_node.path, text, "the number of vCPUs")
            self.store(data, "vcpus", self.checked(vcpu_node.path, vcpus, _VM_TYPES["vcpus"]))
        if "os" in found:
            self.os(found["os"], data)
        else:
            self.missing(node, "<os>", "add <os><type arch='x86_64' machine='pc'>hvm</type></os>")
        if "cpu" in found:
            self.cpu(found["cpu"], data)
        if "features" in found:
            self.attributes(found["features"])
            supported = ", ".join(_FEATURES)
            features = self.children(
                found["features"], _FEATURES, unknown_fix=f"remove it; Fleetvisor supports {supported}"
            )
            for feature in features:
                self.empty(feature)
            data["features"] = [feature.tag for feature in features]
        for event, default in _LIFECYCLE_DEFAULTS.items():
            if event in found:
                action = self.leaf(found[event]).strip()
                if action != default:
                    self.problem(
                        found[event].path,
                        f"action {_shown(action)} is not supported",
                        f"use {default} (the libvirt default, which Fleetvisor follows) or remove the element",
                    )
        if "devices" in found:
            self.devices(found["devices"], data)
        if "metadata" in found:
            self.metadata(found["metadata"], data)
        return data

    def memory_mib(self, node: _Node) -> int | _Invalid:
        """A ``<memory>``-style size in MiB, rounded up; libvirt's default unit is KiB."""
        text = self.leaf(node, {"unit": None})
        unit = node.el.attrib.get("unit", "KiB")
        if unit not in _MEMORY_UNITS:
            self.problem(node.attr_path("unit"), "not a libvirt memory unit", f"use one of {_UNIT_NAMES}")
            return _INVALID
        amount = self.whole_number(node.path, text, "the size")
        if isinstance(amount, _Invalid):
            return amount
        return -(-amount * _MEMORY_UNITS[unit] // _MIB)

    def os(self, node: _Node, data: dict[str, Any]) -> None:
        self.attributes(node)
        found = self.singles(node, {"type", "kernel", "initrd", "cmdline", "boot"})
        if "type" in found:
            self.os_type(found["type"], data)
        else:
            self.missing(node, "<type>", "add <type arch='x86_64' machine='pc'>hvm</type>")
        boot: dict[str, Any] = {}
        for key in ("kernel", "initrd", "cmdline"):
            if key in found:
                self.store(boot, key, self.checked(found[key].path, self.leaf(found[key]), _BOOT_TYPES[key]))
        data["boot"] = boot
        if "boot" in found:
            self.empty(found["boot"], {"dev": ("hd",)}, required=["dev"])

    def os_type(self, node: _Node, data: dict[str, Any]) -> None:
        os_type = self.leaf(node, {"arch": None, "machine": None}).strip()
        if os_type != "hvm":
            self.problem(node.path, f"OS type {_shown(os_type)} is not supported", "use <type>hvm</type>")
        arch = node.el.attrib.get("arch")
        if arch is not None:
            if arch in _LIBVIRT_ARCHES:
                data["arch"] = _ARCH_FROM_LIBVIRT.get(arch, arch)
            else:
                self.problem(
                    node.attr_path("arch"), "not supported", f"use one of {', '.join(_LIBVIRT_ARCHES)}"
                )
        machine = node.el.attrib.get("machine")
        if machine is not None:
            family = _machine_family(machine)
            if family is None:
                self.problem(
                    node.attr_path("machine"),
                    "not supported",
                    "use pc, q35 or microvm (versioned names such as pc-i440fx-7.2 and pc-q35-7.2 are fine)",
                )
            else:
                data["machine"] = family

    def cpu(self, node: _Node, data: dict[str, Any]) -> None:
        rules = {"mode": _CPU_MODES, "match": ("exact",), "check": ("none",), "migratable": ("on",)}
        accepted = self.attributes(node, rules)
        if "mode" in accepted or "mode" not in node.el.attrib:
            data["cpu_mode"] = accepted.get("mode", "custom")  # libvirt's default mode is custom
        found = self.singles(node, {"model"})
        if "model" in found:
            model = self.leaf(found["model"], {"fallback": ("allow",)}).strip()
            self.store(data, "cpu_model", self.checked(found["model"].path, model, _VM_TYPES["cpu_model"]))

    # -- devices ----------------------------------------------------------------------------------

    def devices(self, node: _Node, data: dict[str, Any]) -> None:
        self.attributes(node)
        disks: list[tuple[_Node, dict[str, Any]]] = []
        nics: list[dict[str, Any]] = []
        kinds = {"disk", "interface", "serial", "console", "rng", "memballoon"}
        for child in self.children(node, kinds, repeatable={"disk", "interface"}):
            if child.tag == "disk":
                disks.append((child, self.disk(child)))
            elif child.tag == "interface":
                nics.append(self.interface(child))
            elif child.tag in ("serial", "console"):
                self.console(child)
                data["console"] = True
            elif child.tag == "rng":
                self.rng(child)
                data["rng"] = True
            else:
                model = self.empty(child, {"model": ("virtio", "none")}, required=["model"]).get("model")
                data["balloon"] = model != "none"
        targets = Counter(disk.get("target") for _, disk in disks)
        for disk_node, disk in disks:
            target = disk.get("target")
            if target is not None and targets[target] > 1:
                self.problem(
                    f"{disk_node.path}/target/@dev={target!r}",
                    f"{targets[target]} disks use this target",
                    "give each disk its own target dev",
                )
        data["disks"] = [disk for _, disk in disks]
        data["nics"] = nics

    def disk(self, node: _Node) -> dict[str, Any]:
        self.attributes(node, {"type": ("file",), "device": ("disk",)}, required=["type"])
        disk: dict[str, Any] = {}
        found = self.singles(node, {"driver", "source", "target", "readonly"})
        if "driver" in found:
            driver = self.empty(
                found["driver"], {"name": ("qemu",), "type": ("qcow2", "raw")}, required=["type"]
            )
            self.store(disk, "format", driver.get("type", _INVALID))
        else:
            self.missing(
                node,
                "<driver>",
                "add <driver name='qemu' type='qcow2'/> or type='raw'",
                because=" (libvirt would then read the image as raw)",
            )
        if "source" in found:
            source = self.empty(found["source"], {"file": None}, required=["file"])
            if "file" in source:
                where = found["source"].attr_path("file")
                self.store(disk, "source", self.checked(where, source["file"], _DISK_TYPES["source"]))
        else:
            self.missing(node, "<source>", "add <source file='/var/lib/fleetvisor/images/base.qcow2'/>")
        if "target" in found:
            self.disk_target(found["target"], disk)
        else:
            self.missing(node, "<target>", "add <target dev='vda' bus='virtio'/>")
        if "readonly" in found:
            self.empty(found["readonly"])
            disk["readonly"] = True
        return disk

    def disk_target(self, node: _Node, disk: dict[str, Any]) -> None:
        target = self.empty(node, {"dev": None, "bus": ("virtio", "sata")}, required=["dev"])
        if "dev" in target:
            self.store(
                disk, "target", self.checked(node.attr_path("dev"), target["dev"], _DISK_TYPES["target"])
            )
        if "bus" in target:
            disk["bus"] = target["bus"]
        elif "bus" not in node.el.attrib:
            if target.get("dev", "").startswith("vd"):
                disk["bus"] = "virtio"  # what libvirt infers from a vd* name
            else:
                self.missing(
                    node,
                    "attribute 'bus'",
                    "add bus='virtio' or bus='sata'",
                    because=" (libvirt would pick scsi or ide from the name)",
                )

    def interface(self, node: _Node) -> dict[str, Any]:
        modes = {"user": "user", "bridge": "bridge", "ethernet": "tap"}
        kind = self.attributes(node, {"type": tuple(modes)}, required=["type"]).get("type")
        nic: dict[str, Any] = {}
        if kind is None:
            return nic  # without a usable type its children mean nothing to check
        nic["mode"] = modes[kind]
        # The NIC's one device name: the bridge to join, or the tap device to use.
        device_tag, device_attr = ("source", "bridge") if kind == "bridge" else ("target", "dev")
        found = self.singles(node, {"mac", "model", device_tag})
        if "mac" in found:
            mac = self.empty(found["mac"], {"address": None}, required=["address"]).get("address")
            if mac is not None:
                # libvirt reads MAC addresses case-insensitively; the spec keeps them lower-case.
                where = found["mac"].attr_path("address")
                self.store(nic, "mac", self.checked(where, mac.lower(), _NIC_TYPES["mac"]))
        if "model" in found:
            model = self.empty(found["model"], {"type": ("virtio", "e1000")}, required=["type"]).get("type")
            self.store(nic, "model", model if model is not None else _INVALID)
        else:
            self.missing(
                node,
                "<model>",
                "add <model type='virtio'/> or <model type='e1000'/>",
                because=" (libvirt's default NIC model is not one Fleetvisor has)",
            )
        if device_tag in found:
            device_node = found[device_tag]
            device = self.empty(device_node, {device_attr: None}, required=[device_attr]).get(device_attr)
            if device is not None:
                where = device_node.attr_path(device_attr)
                self.store(nic, "device", self.checked(where, device, _NIC_TYPES["device"]))
        return nic

    def console(self, node: _Node) -> None:
        self.attributes(node, {"type": ("pty", "file")}, required=["type"])
        for child in self.children(node, {"target", "source"}):
            if child.tag == "source":
                self.problem(
                    child.path,
                    "not supported (Fleetvisor writes console output to its own log file)",
                    "remove it",
                )
            elif node.tag == "serial":
                self.empty(child, {"port": ("0",)})
            else:
                self.empty(child, {"type": ("serial", "virtio"), "port": ("0",)})

    def rng(self, node: _Node) -> None:
        self.attributes(node, {"model": ("virtio",)}, required=["model"])
        found = self.singles(node, {"backend"})
        if "backend" not in found:
            self.missing(node, "<backend>", f"add <backend model='random'>{_RNG_SOURCE}</backend>")
            return
        backend = found["backend"]
        source = self.leaf(backend, {"model": ("random",)}).strip()
        if "model" not in backend.el.attrib:
            self.missing(backend, "attribute 'model'", "add model='random'")
        if source not in ("", _RNG_SOURCE):
            self.problem(backend.path, f"source {_shown(source)} is not supported", f"use {_RNG_SOURCE}")

    # -- metadata ---------------------------------------------------------------------------------

    def metadata(self, node: _Node, data: dict[str, Any]) -> None:
        self.attributes(node)
        own = self.singles(
            node,
            {_fv("vm")},
            unknown_fix=(
                "remove it; Fleetvisor keeps only its own element here, "
                f"<fleetvisor:vm xmlns:fleetvisor='{FLEETVISOR_NS}'>"
            ),
        )
        if _fv("vm") not in own:
            return
        vm = own[_fv("vm")]
        self.attributes(vm)
        parts = {_fv("labels"), _fv("workload"), _fv("disk_gib"), _fv("ha"), _fv("disk")}
        overlays: dict[str, tuple[_Node, bool]] = {}
        for child in self.children(vm, parts, repeatable={_fv("disk")}):
            if child.tag == _fv("labels"):
                data["labels"] = self.labels(child)
            elif child.tag == _fv("workload"):
                self.workload(child, data)
            elif child.tag == _fv("disk_gib"):
                size = self.whole_number(child.path, self.leaf(child), "the size in GiB")
                self.store(data, "disk_gib", self.checked(child.path, size, _VM_TYPES["disk_gib"]))
            elif child.tag == _fv("ha"):
                self.ha(child, data)
            else:
                attrs = self.empty(
                    child, {"target": None, "overlay": ("yes", "no")}, required=["target", "overlay"]
                )
                if "target" in attrs and attrs["target"] in overlays:
                    self.problem(child.attr_path("target"), "disk listed twice", "keep only one")
                elif "target" in attrs and "overlay" in attrs:
                    overlays[attrs["target"]] = (child, attrs["overlay"] == "yes")
        disks_by_target = {disk.get("target"): disk for disk in data.get("disks", [])}
        for target, (child, overlay) in overlays.items():
            if target in disks_by_target:
                disks_by_target[target]["overlay"] = overlay
            else:
                self.problem(
                    child.attr_path("target"),
                    "no disk has this target",
                    "use the <target dev> of a disk, or remove it",
                )

    def labels(self, node: _Node) -> dict[str, str]:
        self.attributes(node)
        labels: dict[str, str] = {}
        for child in self.children(node, {_fv("label")}, repeatable={_fv("label")}):
            attrs = self.empty(child, {"key": None, "value": None}, required=["key", "value"])
            if "key" not in attrs or "value" not in attrs:
                continue
            key = self.checked(child.attr_path("key"), attrs["key"], _LABEL_KEY_TYPE)
            value = self.checked(child.attr_path("value"), attrs["value"], _LABEL_VALUE_TYPE)
            if isinstance(key, _Invalid) or isinstance(value, _Invalid):
                continue
            if key in labels:
                self.problem(child.attr_path("key"), "label given twice", "keep only one")
            labels[key] = value
        return labels

    def ha(self, node: _Node, data: dict[str, Any]) -> None:
        attrs = self.empty(node, {"enabled": ("yes", "no"), "priority": None})
        if "enabled" in attrs:
            data["ha"] = attrs["enabled"] == "yes"
        if "priority" in attrs:
            where = node.attr_path("priority")
            priority = self.whole_number(where, attrs["priority"], "the priority")
            self.store(data, "ha_priority", self.checked(where, priority, _VM_TYPES["ha_priority"]))

    def workload(self, node: _Node, data: dict[str, Any]) -> None:
        names = [spec_field.name for spec_field in msgspec.structs.fields(vmspec.VmWorkload)]
        workload: dict[str, Any] = {}
        for name, text in self.empty(node, dict.fromkeys(names)).items():
            where = node.attr_path(name)
            if _DECIMAL_RE.fullmatch(text):
                self.store(workload, name, self.checked(where, float(text), _WORKLOAD_TYPES[name]))
            else:
                self.problem(where, "not a decimal number", "write a number such as 0.5")
        data["workload"] = workload


# -- export ---------------------------------------------------------------------------------------


def spec_to_xml(spec: vmspec.VmSpec) -> str:
    """The libvirt domain XML of ``spec``: indented, deterministic, ending in a newline.

    Equal specs give identical text, and :func:`spec_from_xml` reads it back to an equal spec.
    Raises :class:`DomainXmlError` when ``spec`` is not valid, or is one of the few valid specs with
    no faithful XML form (see the module docstring).
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
    os = domain.add("os")
    os.add(
        "type", ("arch", _ARCH_TO_LIBVIRT.get(spec.arch, spec.arch)), ("machine", spec.machine), text="hvm"
    )
    for key in ("kernel", "initrd", "cmdline"):
        value = getattr(spec.boot, key)
        if value:
            os.add(key, text=value)
    if spec.boot.kernel is None:
        os.add("boot", ("dev", "hd"))
    if spec.features:
        features = domain.add("features")
        for feature in spec.features:
            features.add(feature)
    if spec.cpu_mode != "default":
        cpu = domain.add("cpu", ("mode", spec.cpu_mode))
        if spec.cpu_model:
            cpu.add("model", text=spec.cpu_model)
    for event, action in _LIFECYCLE_DEFAULTS.items():
        domain.add(event, text=action)
    devices = domain.add("devices")
    for disk in spec.disks:
        _add_disk(devices, disk)
    for nic in spec.nics:
        _add_nic(devices, nic)
    if spec.console:
        devices.add("serial", ("type", "pty")).add("target", ("port", "0"))
        devices.add("console", ("type", "pty")).add("target", ("type", "virtio"), ("port", "0"))
    if spec.rng:
        devices.add("rng", ("model", "virtio")).add("backend", ("model", "random"), text=_RNG_SOURCE)
    devices.add("memballoon", ("model", "virtio" if spec.balloon else "none"))
    lines: list[str] = []
    domain.write(lines, 0)
    return "\n".join(lines) + "\n"


def _export_problems(spec: vmspec.VmSpec) -> list[str]:
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
    texts = [
        ("boot.kernel", spec.boot.kernel),
        ("boot.initrd", spec.boot.initrd),
        ("boot.cmdline", spec.boot.cmdline),
        *((f"disks[{index}].source", disk.source) for index, disk in enumerate(spec.disks)),
        *((f"labels[{key!r}]", value) for key, value in spec.labels.items()),
    ]
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
            vm.add(f"{FLEETVISOR_PREFIX}:disk", ("target", disk.target), ("overlay", "no"))
    return vm if vm.children else None


def _add_disk(devices: _Out, disk: vmspec.DiskSpec) -> None:
    element = devices.add("disk", ("type", "file"), ("device", "disk"))
    element.add("driver", ("name", "qemu"), ("type", disk.format))
    element.add("source", ("file", disk.source))
    element.add("target", ("dev", disk.target), ("bus", disk.bus))
    if disk.readonly:
        element.add("readonly")


def _add_nic(devices: _Out, nic: vmspec.NicSpec) -> None:
    kind = {"user": "user", "bridge": "bridge", "tap": "ethernet"}[nic.mode]
    element = devices.add("interface", ("type", kind))
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
    """An element to write. A tiny serializer of our own keeps the output exact: libvirt's quoting
    style, a fixed prefix for our namespace, and escapes ElementTree does not make (``\\r`` in text)."""

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
