"""Domain XML import: :func:`spec_from_xml` reads a libvirt domain document into a VM spec.

The input is screened before it is parsed (size cap, no DOCTYPE or ENTITY, no lone surrogates),
then :class:`_Reader` walks it, one small handler per element, taking each element's accepted
attributes and children from :mod:`protocols.domxml.vocabulary` and checking them with the
generic checks of :mod:`protocols.domxml.checks`. Every problem is collected and reported together
in one :class:`~protocols.domxml.errors.DomainXmlError`.

It imports only the stdlib, msgspec and protocols modules; protocols imports nothing of ours
outside protocols.
"""

from __future__ import annotations

import re
import typing
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import msgspec

from protocols import vmspec
from protocols.domxml import vocabulary
from protocols.domxml.checks import FV_PREFIX, INVALID, Checks, Data, Invalid, Node, readable, rule_at, shown
from protocols.domxml.errors import DomainXmlError

#: Largest document :func:`spec_from_xml` reads. A domain XML is a few KiB.
MAX_XML_BYTES: Final = 1024 * 1024

_MIB: Final = 1024 * 1024
_UNIT_NAMES: Final = ", ".join(vocabulary.MEMORY_UNITS)
_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}")
_DECIMAL_RE: Final = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")
_DECLARATION_RE: Final = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")

_VM_TYPES: Final = typing.get_type_hints(vmspec.VmSpec, include_extras=True)
_DISK_TYPES: Final = typing.get_type_hints(vmspec.DiskSpec, include_extras=True)
_NIC_TYPES: Final = typing.get_type_hints(vmspec.NicSpec, include_extras=True)
_BOOT_TYPES: Final = typing.get_type_hints(vmspec.BootSpec, include_extras=True)
_WORKLOAD_TYPES: Final = typing.get_type_hints(vmspec.VmWorkload, include_extras=True)
_LABEL_KEY_TYPE, _LABEL_VALUE_TYPE = typing.get_args(_VM_TYPES["labels"])

_HEADING: Final = "domain XML refused"
_VM: Final = f"/domain/metadata/{FV_PREFIX}vm"
_Handler = Callable[[Node, Data], None]


def spec_from_xml(text: str) -> vmspec.VmSpec:
    """Build a VM spec from a libvirt domain XML document (``docs/domxml.md`` has the mapping).

    Raises :class:`DomainXmlError` listing every problem: input over :data:`MAX_XML_BYTES`, a
    DOCTYPE or ENTITY declaration, malformed XML (with line and column), each element or attribute
    that is not supported, and each value the spec refuses, named by the XML it came from.
    Raises TypeError when ``text`` is not a str (decode bytes first).
    """
    if not isinstance(text, str):
        raise TypeError(
            f"spec_from_xml takes the document as str, not {type(text).__name__}; decode it first"
        )
    _screen(text)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        line, column = exc.position
        reason = str(exc).split(":", 1)[0]
        raise DomainXmlError(
            _HEADING, [f"line {line}, column {column + 1}: malformed XML ({reason}); fix the XML syntax"]
        ) from None
    reader = _Reader()
    data = reader.domain(root)
    heading = f"domain XML for {data['name']!r} refused" if isinstance(data.get("name"), str) else _HEADING
    if not reader.problems:
        try:
            return msgspec.convert(data, vmspec.VmSpecInput).to_spec()
        except msgspec.ValidationError as exc:
            # Each value was checked against its field's type already; this is only a backstop.
            reader.problems.append(f"/domain: {vmspec.explain_validation_error(exc)}; fix that value")
    raise DomainXmlError(heading, reader.problems)


def _screen(text: str) -> None:
    """Refuse, before parsing, what no domain XML needs: a huge text, declarations, lone surrogates."""
    if len(text) > MAX_XML_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_XML_BYTES:
        raise DomainXmlError(
            _HEADING,
            [
                f"input: larger than the {MAX_XML_BYTES // 1024} KiB limit; a domain XML is a few KiB, "
                "check that this is the right file"
            ],
        )
    declaration = _DECLARATION_RE.search(text)
    if declaration:
        raise DomainXmlError(
            _HEADING,
            [
                f"line {_line_of(text, declaration.start())}: {declaration.group(1).upper()} declarations "
                "are refused (they allow entity-expansion and external-entity attacks); remove the "
                "<!DOCTYPE ...> block, domain XML needs none"
            ],
        )
    surrogate = _SURROGATE_RE.search(text)
    if surrogate:
        raise DomainXmlError(
            _HEADING,
            [
                f"line {_line_of(text, surrogate.start())}: the text holds a lone surrogate "
                f"(U+{ord(surrogate.group()):04X}), which no XML document can; fix the text's encoding"
            ],
        )


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _machine_family(machine: str) -> str | None:
    if machine in vocabulary.MACHINES:
        return machine
    for pattern, family in vocabulary.VERSIONED_MACHINES:
        if pattern.fullmatch(machine):
            return family
    return None


class _Reader(Checks):
    """Walks a domain element, collecting the spec's data and every problem on the way."""

    # -- the domain -------------------------------------------------------------------------------

    def domain(self, root: ET.Element) -> Data:
        node = Node(root, f"/{readable(root.tag)}")
        data: Data = {"features": [], "console": False, "rng": False, "balloon": True}
        if root.tag != "domain":
            self.problem(node.path, "not a libvirt domain document", "give a <domain type='kvm'> document")
            return data
        rule = rule_at("/domain")
        self.attributes(node, rule.attributes, rule.required)
        if "id" in root.attrib and not root.attrib["id"].lstrip("-").isdigit():
            self.problem(
                node.attr_path("id"), "not a domain id", "remove it (a running domain's id is not kept)"
            )
        found = self.parts(node, rule)
        handlers: dict[str, _Handler] = {
            "name": self.name,
            "uuid": self.uuid,
            "memory": self.memory,
            "currentMemory": self.memory,
            "vcpu": self.vcpu,
            "os": self.os,
            "cpu": self.cpu,
            "features": self.features,
            **dict.fromkeys(vocabulary.LIFECYCLE_DEFAULTS, self.lifecycle),
            "devices": self.devices,
            "metadata": self.metadata,
        }
        for name, handler in handlers.items():
            child = self.part(node, found, f"/domain/{name}")
            if child is not None:
                handler(child, data)
        return data

    def name(self, node: Node, data: Data) -> None:
        name = self.leaf(node, rule_at("/domain/name")).strip()
        self.store(data, "name", self.checked(node.path, name, _VM_TYPES["name"]))

    def uuid(self, node: Node, data: Data) -> None:
        uuid = self.leaf(node, rule_at("/domain/uuid")).strip()
        if not _UUID_RE.fullmatch(uuid):
            self.problem(
                node.path,
                f"{shown(uuid)} is not a UUID",
                "write one like 4dea22b3-1d52-d8f3-2516-782e98ab3fa0, or remove it (it is not kept)",
            )

    def memory(self, node: Node, data: Data) -> None:
        """``<memory>`` or ``<currentMemory>``, into the field the vocabulary maps it to."""
        key = rule_at(f"/domain/{node.name}").maps_to
        mib = self.memory_mib(node)
        where = f"{node.path} (= {mib} MiB)" if isinstance(mib, int) else node.path
        self.store(data, key, self.checked(where, mib, _VM_TYPES[key]))

    def memory_mib(self, node: Node) -> int | Invalid:
        """A ``<memory>``-style size in MiB, rounded up; libvirt's default unit is KiB."""
        text = self.leaf(node, rule_at(f"/domain/{node.name}"))
        unit = node.el.attrib.get("unit", vocabulary.DEFAULT_MEMORY_UNIT)
        if unit not in vocabulary.MEMORY_UNITS:
            self.problem(node.attr_path("unit"), "not a libvirt memory unit", f"use one of {_UNIT_NAMES}")
            return INVALID
        amount = self.whole_number(node.path, text, "the size")
        if isinstance(amount, Invalid):
            return amount
        return -(-amount * vocabulary.MEMORY_UNITS[unit] // _MIB)

    def vcpu(self, node: Node, data: Data) -> None:
        text = self.leaf(node, rule_at("/domain/vcpu"))
        vcpus = self.whole_number(node.path, text, "the number of vCPUs")
        self.store(data, "vcpus", self.checked(node.path, vcpus, _VM_TYPES["vcpus"]))

    def os(self, node: Node, data: Data) -> None:
        self.attributes(node)
        found = self.parts(node, rule_at("/domain/os"))
        os_type = self.part(node, found, "/domain/os/type")
        if os_type is not None:
            self.os_type(os_type, data)
        boot: Data = {}
        for key in ("kernel", "initrd", "cmdline"):
            if key in found:
                text = self.leaf(found[key], rule_at(f"/domain/os/{key}"))
                self.store(boot, key, self.checked(found[key].path, text, _BOOT_TYPES[key]))
        data["boot"] = boot
        if "boot" in found:
            self.empty(found["boot"], rule_at("/domain/os/boot"))

    def os_type(self, node: Node, data: Data) -> None:
        os_type = self.leaf(node, rule_at("/domain/os/type")).strip()
        if os_type != "hvm":
            self.problem(node.path, f"OS type {shown(os_type)} is not supported", "use <type>hvm</type>")
        arch = node.el.attrib.get("arch")
        if arch is not None:
            if arch in vocabulary.LIBVIRT_ARCHES:
                data["arch"] = vocabulary.ARCH_FROM_LIBVIRT.get(arch, arch)
            else:
                arches = ", ".join(vocabulary.LIBVIRT_ARCHES)
                self.problem(node.attr_path("arch"), "not supported", f"use one of {arches}")
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

    def cpu(self, node: Node, data: Data) -> None:
        rule = rule_at("/domain/cpu")
        accepted = self.attributes(node, rule.attributes, rule.required)
        if "mode" in accepted or "mode" not in node.el.attrib:
            data["cpu_mode"] = accepted.get("mode", vocabulary.DEFAULT_CPU_MODE)
        found = self.parts(node, rule)
        if "model" in found:
            model = self.leaf(found["model"], rule_at("/domain/cpu/model")).strip()
            self.store(data, "cpu_model", self.checked(found["model"].path, model, _VM_TYPES["cpu_model"]))

    def features(self, node: Node, data: Data) -> None:
        self.attributes(node)
        features = self.contents(node, rule_at("/domain/features"))
        for feature in features:
            self.empty(feature, rule_at(f"/domain/features/{feature.name}"))
        data["features"] = [feature.tag for feature in features]

    def lifecycle(self, node: Node, data: Data) -> None:
        """``<on_poweroff>`` and friends: only libvirt's default action, which Fleetvisor does."""
        default = vocabulary.LIFECYCLE_DEFAULTS[node.name]
        action = self.leaf(node, rule_at(f"/domain/{node.name}")).strip()
        if action != default:
            self.problem(
                node.path,
                f"action {shown(action)} is not supported",
                f"use {default} (the libvirt default, which Fleetvisor follows) or remove the element",
            )

    # -- devices ----------------------------------------------------------------------------------

    def devices(self, node: Node, data: Data) -> None:
        self.attributes(node)
        disks: list[tuple[Node, Data]] = []
        nics: list[Data] = []
        for child in self.contents(node, rule_at("/domain/devices")):
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
                model = self.empty(child, rule_at("/domain/devices/memballoon")).get("model")
                data["balloon"] = model != "none"
        self.distinct_targets(disks)
        data["disks"] = [disk for _, disk in disks]
        data["nics"] = nics

    def distinct_targets(self, disks: Sequence[tuple[Node, Data]]) -> None:
        targets = Counter(disk.get("target") for _, disk in disks)
        for disk_node, disk in disks:
            target = disk.get("target")
            if target is not None and targets[target] > 1:
                self.problem(
                    f"{disk_node.path}/target/@dev={target!r}",
                    f"{targets[target]} disks use this target",
                    "give each disk its own target dev",
                )

    def disk(self, node: Node) -> Data:
        rule = rule_at("/domain/devices/disk")
        self.attributes(node, rule.attributes, rule.required)
        disk: Data = {}
        found = self.parts(node, rule)
        driver = self.part(node, found, "/domain/devices/disk/driver")
        if driver is not None:
            self.store(
                disk, "format", self.empty(driver, rule_at(rule.path + "/driver")).get("type", INVALID)
            )
        source = self.part(node, found, "/domain/devices/disk/source")
        if source is not None:
            attrs = self.empty(source, rule_at(rule.path + "/source"))
            if "file" in attrs:
                where = source.attr_path("file")
                self.store(disk, "source", self.checked(where, attrs["file"], _DISK_TYPES["source"]))
        target = self.part(node, found, "/domain/devices/disk/target")
        if target is not None:
            self.disk_target(target, disk)
        if "readonly" in found:
            self.empty(found["readonly"], rule_at(rule.path + "/readonly"))
            disk["readonly"] = True
        return disk

    def disk_target(self, node: Node, disk: Data) -> None:
        target = self.empty(node, rule_at("/domain/devices/disk/target"))
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

    def interface(self, node: Node) -> Data:
        rule = rule_at("/domain/devices/interface")
        kind = self.attributes(node, rule.attributes, rule.required).get("type")
        nic: Data = {}
        if kind is None:
            return nic  # without a usable type its children mean nothing to check
        nic["mode"] = vocabulary.NIC_MODES[kind]
        # The NIC's one device name: the bridge to join, or the tap device to use.
        device_tag, other_tag = ("source", "target") if kind == "bridge" else ("target", "source")
        found = self.parts(node, rule, without=[other_tag])
        if "mac" in found:
            self.nic_mac(found["mac"], nic)
        model = self.part(node, found, f"{rule.path}/model")
        if model is not None:
            model_type = self.empty(model, rule_at(f"{rule.path}/model")).get("type")
            self.store(nic, "model", model_type if model_type is not None else INVALID)
        if device_tag in found:
            self.nic_device(found[device_tag], nic)
        return nic

    def nic_mac(self, node: Node, nic: Data) -> None:
        mac = self.empty(node, rule_at("/domain/devices/interface/mac")).get("address")
        if mac is not None:
            # libvirt reads MAC addresses case-insensitively; the spec keeps them lower-case.
            self.store(nic, "mac", self.checked(node.attr_path("address"), mac.lower(), _NIC_TYPES["mac"]))

    def nic_device(self, node: Node, nic: Data) -> None:
        """``<source bridge>`` of a bridge NIC, or ``<target dev>`` (the tap) of the others."""
        rule = rule_at(f"/domain/devices/interface/{node.name}")
        (attr,) = rule.required
        device = self.empty(node, rule).get(attr)
        if device is not None:
            self.store(nic, "device", self.checked(node.attr_path(attr), device, _NIC_TYPES["device"]))

    def console(self, node: Node) -> None:
        """``<serial>`` or ``<console>``."""
        rule = rule_at(f"/domain/devices/{node.name}")
        self.attributes(node, rule.attributes, rule.required)
        for child in self.contents(node, rule):
            child_rule = rule_at(f"{rule.path}/{child.name}")
            if child_rule.refused:
                self.problem(child.path, child_rule.refused, "remove it")
            else:
                self.empty(child, child_rule)

    def rng(self, node: Node) -> None:
        rule = rule_at("/domain/devices/rng")
        self.attributes(node, rule.attributes, rule.required)
        backend = self.part(node, self.parts(node, rule), f"{rule.path}/backend")
        if backend is None:
            return
        backend_rule = rule_at(f"{rule.path}/backend")
        source = self.leaf(backend, backend_rule).strip()
        self.required_attributes(backend, backend_rule.attributes, backend_rule.required)
        if source not in ("", vocabulary.RNG_SOURCE):
            self.problem(
                backend.path, f"source {shown(source)} is not supported", f"use {vocabulary.RNG_SOURCE}"
            )

    # -- metadata ---------------------------------------------------------------------------------

    def metadata(self, node: Node, data: Data) -> None:
        self.attributes(node)
        own = self.parts(node, rule_at("/domain/metadata"))
        if f"{FV_PREFIX}vm" not in own:
            return
        vm = own[f"{FV_PREFIX}vm"]
        self.attributes(vm)
        handlers: dict[str, _Handler] = {
            f"{FV_PREFIX}labels": self.labels,
            f"{FV_PREFIX}workload": self.workload,
            f"{FV_PREFIX}disk_gib": self.disk_gib,
            f"{FV_PREFIX}ha": self.ha,
        }
        overlays: dict[str, tuple[Node, bool, bool]] = {}
        for child in self.contents(vm, rule_at(_VM)):
            if child.name in handlers:
                handlers[child.name](child, data)
            else:
                self.overlay(child, overlays)
        self.apply_overlays(overlays, data)

    def labels(self, node: Node, data: Data) -> None:
        self.attributes(node)
        labels: dict[str, str] = {}
        label_rule = rule_at(f"{_VM}/{FV_PREFIX}labels/{FV_PREFIX}label")
        for child in self.contents(node, rule_at(f"{_VM}/{FV_PREFIX}labels")):
            attrs = self.empty(child, label_rule)
            if "key" not in attrs or "value" not in attrs:
                continue
            key = self.checked(child.attr_path("key"), attrs["key"], _LABEL_KEY_TYPE)
            value = self.checked(child.attr_path("value"), attrs["value"], _LABEL_VALUE_TYPE)
            if isinstance(key, Invalid) or isinstance(value, Invalid):
                continue
            if key in labels:
                self.problem(child.attr_path("key"), "label given twice", "keep only one")
            labels[key] = value
        data["labels"] = labels

    def workload(self, node: Node, data: Data) -> None:
        workload: Data = {}
        for name, text in self.empty(node, rule_at(f"{_VM}/{FV_PREFIX}workload")).items():
            where = node.attr_path(name)
            if _DECIMAL_RE.fullmatch(text):
                self.store(workload, name, self.checked(where, float(text), _WORKLOAD_TYPES[name]))
            else:
                self.problem(where, "not a decimal number", "write a number such as 0.5")
        data["workload"] = workload

    def disk_gib(self, node: Node, data: Data) -> None:
        size = self.whole_number(
            node.path, self.leaf(node, rule_at(f"{_VM}/{FV_PREFIX}disk_gib")), "the size in GiB"
        )
        self.store(data, "disk_gib", self.checked(node.path, size, _VM_TYPES["disk_gib"]))

    def ha(self, node: Node, data: Data) -> None:
        attrs = self.empty(node, rule_at(f"{_VM}/{FV_PREFIX}ha"))
        if "enabled" in attrs:
            data["ha"] = attrs["enabled"] == "yes"
        if "priority" in attrs:
            where = node.attr_path("priority")
            priority = self.whole_number(where, attrs["priority"], "the priority")
            self.store(data, "ha_priority", self.checked(where, priority, _VM_TYPES["ha_priority"]))

    def overlay(self, node: Node, overlays: dict[str, tuple[Node, bool, bool]]) -> None:
        """One ``<fleetvisor:disk target overlay [writable]>``, collected until the disks are known."""
        attrs = self.empty(node, rule_at(f"{_VM}/{FV_PREFIX}disk"))
        if "target" in attrs and attrs["target"] in overlays:
            self.problem(node.attr_path("target"), "disk listed twice", "keep only one")
        elif "target" in attrs and "overlay" in attrs:
            overlays[attrs["target"]] = (node, attrs["overlay"] == "yes", attrs.get("writable") == "yes")

    def apply_overlays(self, overlays: Mapping[str, tuple[Node, bool, bool]], data: Data) -> None:
        disks_by_target = {disk.get("target"): disk for disk in data.get("disks", [])}
        for target, (node, overlay, writable) in overlays.items():
            if target in disks_by_target:
                disks_by_target[target]["overlay"] = overlay
                if writable:
                    disks_by_target[target]["writable"] = True
            else:
                self.problem(
                    node.attr_path("target"),
                    "no disk has this target",
                    "use the <target dev> of a disk, or remove it",
                )
