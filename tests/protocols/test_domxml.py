"""libvirt domain XML import and export (protocols.domxml).

The samples in ``domxml_samples/`` are written from libvirt's documented domain XML format:
``good_*.xml`` must import to the spec in :data:`EXPECTED`, ``bad_*.xml`` must be refused with a
message naming each place in :data:`REFUSALS`. Export is checked by round trips (every good sample,
and random valid specs from hypothesis) and against a golden file.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import domxml, vmspec
from protocols.vmspec import BootSpec, DiskSpec, NicSpec, VmSpec, VmWorkload

SAMPLES = Path(__file__).parent / "domxml_samples"
IMAGES = "/var/lib/fleetvisor/images"
KERNELS = "/var/lib/fleetvisor/kernels"


def sample(name: str) -> str:
    return (SAMPLES / name).read_text(encoding="utf-8")


#: What each good sample imports to. Every field is spelt out where it differs from the default.
EXPECTED: dict[str, VmSpec] = {
    "good_minimal.xml": VmSpec(name="minimal", memory_mib=512, features=[], console=False, rng=False),
    "good_direct_kernel_boot.xml": VmSpec(
        name="installer",
        vcpus=2,
        memory_mib=1024,
        boot=BootSpec(
            kernel=f"{KERNELS}/vmlinuz-6.1",
            initrd=f"{KERNELS}/initrd-6.1.img",
            cmdline="console=ttyS0 root=/dev/vda1 ro quiet",
        ),
        disks=[DiskSpec(target="vda", source=f"{IMAGES}/rootfs.img", format="raw")],
        features=["acpi", "apic"],
        console=False,
        rng=False,
    ),
    "good_memory_units.xml": VmSpec(
        name="units", memory_mib=4096, current_memory_mib=1908, features=[], console=False, rng=False
    ),
    "good_vcpu_host_passthrough.xml": VmSpec(
        name="compute-8",
        vcpus=8,
        memory_mib=8192,
        current_memory_mib=8192,
        machine="q35",
        cpu_mode="host-passthrough",
        disks=[DiskSpec(target="vda", source=f"{IMAGES}/debian-12.qcow2")],
        features=["acpi", "apic"],
        console=False,
        rng=False,
    ),
    "good_cpu_host_model.xml": VmSpec(
        name="hostmodel",
        vcpus=4,
        memory_mib=2048,
        current_memory_mib=1536,
        cpu_mode="host-model",
        features=[],
        console=False,
        rng=False,
    ),
    "good_cpu_custom.xml": VmSpec(
        name="skylake",
        vcpus=2,
        memory_mib=2048,
        machine="q35",
        cpu_mode="custom",
        cpu_model="Skylake-Server",
        features=[],
        console=False,
        rng=False,
    ),
    "good_cpu_model_without_mode.xml": VmSpec(
        name="haswell",
        memory_mib=1024,
        cpu_mode="custom",
        cpu_model="Haswell-noTSX",
        features=[],
        console=False,
        rng=False,
    ),
    "good_disks.xml": VmSpec(
        name="storage",
        vcpus=2,
        memory_mib=2048,
        machine="q35",
        disks=[
            DiskSpec(target="vda", source=f"{IMAGES}/root.qcow2", format="qcow2", bus="virtio"),
            DiskSpec(target="sda", source=f"{IMAGES}/data.raw", format="raw", bus="sata"),
            DiskSpec(target="sdb", source=f"{IMAGES}/seed.iso", format="raw", bus="sata", readonly=True),
            DiskSpec(target="vdb", source=f"{IMAGES}/scratch.qcow2", format="qcow2", bus="virtio"),
        ],
        features=[],
        console=False,
        rng=False,
    ),
    "good_interfaces.xml": VmSpec(
        name="netbox",
        memory_mib=1024,
        nics=[
            NicSpec(mode="user", model="virtio", mac="52:54:00:12:34:56"),
            NicSpec(mode="bridge", model="e1000", mac="52:54:00:ab:cd:ef", device="br0"),
            NicSpec(mode="tap", model="virtio", mac="52:54:00:00:00:01", device="tap-web1"),
            NicSpec(mode="user", model="e1000"),
        ],
        features=[],
        console=False,
        rng=False,
    ),
    "good_serial_console.xml": VmSpec(
        name="console-1", memory_mib=512, features=[], console=True, rng=True, balloon=False
    ),
    "good_features.xml": VmSpec(
        name="legacy32",
        vcpus=2,
        memory_mib=3072,
        arch="i386",
        disks=[DiskSpec(target="sda", source=f"{IMAGES}/legacy32.qcow2", bus="sata")],
        features=["pae", "acpi", "apic"],
        console=False,
        rng=False,
    ),
    "good_microvm.xml": VmSpec(
        name="micro-1",
        memory_mib=256,
        machine="microvm",
        cpu_mode="host-passthrough",
        boot=BootSpec(kernel=f"{KERNELS}/vmlinux-microvm", cmdline="console=hvc0 root=/dev/vda reboot=t"),
        disks=[DiskSpec(target="vda", source=f"{IMAGES}/micro-rootfs.ext4", format="raw")],
        nics=[NicSpec(mode="tap", device="tap-micro1")],
        features=[],
        console=True,
        rng=False,
        balloon=False,
    ),
    "good_fleetvisor_metadata.xml": VmSpec(
        name="web-1",
        vcpus=2,
        memory_mib=1024,
        disk_gib=20,
        ha=True,
        ha_priority=10,
        labels={"team": "web", "tier": "frontend & edge"},
        workload=VmWorkload(cpu_util=0.75, dirty_mib_s=12.5, boot_s=3.0),
        disks=[
            DiskSpec(target="vda", source=f"{IMAGES}/base.qcow2"),
            DiskSpec(target="vdb", source="/var/lib/fleetvisor/volumes/web-1-data.qcow2", overlay=False),
        ],
        features=[],
        console=False,
        rng=False,
    ),
}

#: A spec that uses every field; its export is pinned byte for byte in good_export_full.xml.
FULL_SPEC = VmSpec(
    name="full-1",
    vcpus=4,
    memory_mib=4096,
    current_memory_mib=3072,
    disk_gib=40,
    arch="x86_64",
    labels={"zone": "b", "team": "web & api", "note": "two\nlines\tand 'quotes'"},
    workload=VmWorkload(cpu_util=0.5, dirty_mib_s=64.0, boot_s=2.5),
    machine="q35",
    cpu_mode="custom",
    cpu_model="Skylake-Server",
    boot=BootSpec(
        kernel=f"{KERNELS}/vmlinuz", initrd=f"{KERNELS}/initrd.img", cmdline="console=ttyS0 <quiet>"
    ),
    disks=[
        DiskSpec(target="vda", source=f"{IMAGES}/base.qcow2"),
        DiskSpec(
            target="sda", source=f"{IMAGES}/data.raw", format="raw", bus="sata", overlay=False, writable=True
        ),
        DiskSpec(target="vdb", source=f"{IMAGES}/seed.img", format="raw", readonly=True),
    ],
    nics=[
        NicSpec(mac="52:54:00:12:34:56"),
        NicSpec(mode="bridge", device="br0", model="e1000"),
        NicSpec(mode="tap", device="tap0", mac="52:54:00:00:00:02"),
    ],
    features=["acpi", "apic", "pae"],
    console=True,
    rng=True,
    balloon=True,
    ha=True,
    ha_priority=500,
)
EXPECTED["good_export_full.xml"] = FULL_SPEC

#: Where each spec field lives in domain XML. A field VmSpec gains fails
#: test_every_spec_field_has_an_xml_home until it is listed here; map it in domxml and add it to
#: the random-spec strategy and FULL_SPEC at the same time, so the round trip covers every field.
XML_HOME: dict[type[msgspec.Struct], dict[str, str]] = {
    VmSpec: {
        "name": "/domain/name",
        "vcpus": "/domain/vcpu",
        "memory_mib": "/domain/memory",
        "disk_gib": "/domain/metadata/fleetvisor:vm/fleetvisor:disk_gib",
        "arch": "/domain/os/type/@arch",
        "labels": "/domain/metadata/fleetvisor:vm/fleetvisor:labels",
        "workload": "/domain/metadata/fleetvisor:vm/fleetvisor:workload",
        "machine": "/domain/os/type/@machine",
        "cpu_mode": "/domain/cpu/@mode",
        "cpu_model": "/domain/cpu/model",
        "current_memory_mib": "/domain/currentMemory",
        "boot": "/domain/os/kernel, initrd, cmdline",
        "disks": "/domain/devices/disk",
        "nics": "/domain/devices/interface",
        "features": "/domain/features",
        "console": "/domain/devices/serial and console",
        "rng": "/domain/devices/rng",
        "balloon": "/domain/devices/memballoon",
        "ha": "/domain/metadata/fleetvisor:vm/fleetvisor:ha/@enabled",
        "ha_priority": "/domain/metadata/fleetvisor:vm/fleetvisor:ha/@priority",
    },
    DiskSpec: {
        "target": "target/@dev",
        "source": "source/@file",
        "format": "driver/@type",
        "bus": "target/@bus",
        "readonly": "readonly",
        "overlay": "/domain/metadata/fleetvisor:vm/fleetvisor:disk/@overlay",
        "writable": "/domain/metadata/fleetvisor:vm/fleetvisor:disk/@writable",
    },
    NicSpec: {"model": "model/@type", "mode": "@type", "mac": "mac/@address", "device": "source or target"},
    BootSpec: {"kernel": "kernel", "initrd": "initrd", "cmdline": "cmdline"},
    VmWorkload: {"cpu_util": "@cpu_util", "dirty_mib_s": "@dirty_mib_s", "boot_s": "@boot_s"},
}

#: For each bad sample, the places (and words) its error message must name.
REFUSALS: dict[str, list[str]] = {
    "bad_hostdev.xml": ["/domain/devices/hostdev: not supported; remove it"],
    "bad_disk_block.xml": ["/domain/devices/disk[2]/@type='block': not supported; use type='file'"],
    "bad_graphics_vnc.xml": [
        "/domain/devices/graphics: not supported; remove it; Fleetvisor VMs are headless",
        "/domain/devices/video: not supported",
    ],
    "bad_unknown_attribute.xml": ["/domain/devices/disk/driver/@cache='none': not supported; remove it"],
    "bad_malformed.xml": ["line 5, column 43: malformed XML (mismatched tag); fix the XML syntax"],
    "bad_entity_bomb.xml": ["line 2: DOCTYPE declarations are refused", "remove the <!DOCTYPE"],
    "bad_external_entity.xml": ["line 2: DOCTYPE declarations are refused"],
    "bad_relative_path.xml": [
        "/domain/devices/disk/source/@file='images/base.qcow2': invalid value: Expected an absolute path"
    ],
    "bad_interface_network.xml": [
        "/domain/devices/interface/@type='network': not supported; use type='user', type='bridge'"
    ],
    "bad_lifecycle_and_placement.xml": [
        "/domain/vcpu/@placement='auto': not supported; use placement='static'",
        "/domain/on_reboot: action 'destroy' is not supported; use restart",
        "/domain/on_crash: action 'coredump-restart' is not supported; use destroy",
    ],
    "bad_serial_file_path.xml": ["/domain/devices/serial/source: not supported", "remove it"],
    "bad_foreign_metadata.xml": [
        "/domain/description: not supported",
        "/domain/metadata/{http://libosinfo.org/xmlns/libvirt/domain/1.0}libosinfo: not supported",
    ],
    "bad_values.xml": [
        "/domain/name: invalid value: Expected a VM name",
        "/domain/memory/@unit='PiB': not a libvirt memory unit; use one of b, bytes, KB",
        "/domain/currentMemory (= 1 MiB): invalid value: Expected `int` >= 16",
        "/domain/vcpu: 'many' is not a whole number",
        "/domain/os/type: OS type 'linux' is not supported; use <type>hvm</type>",
        "/domain/os/type/@arch='sparc64': not supported",
        "/domain/os/type/@machine='virt': not supported; use pc, q35 or microvm",
        "/domain/os/kernel: invalid value: Expected an absolute path",
        "/domain/cpu/@mode='maximum': not supported",
        "/domain/features/hap: not supported; remove it; Fleetvisor supports acpi, apic, pae",
        "/domain/devices/disk/@device='cdrom': not supported; use device='disk'",
        "/domain/devices/disk/driver/@type='vmdk': not supported; use type='qcow2' or type='raw'",
        "/domain/devices/disk/target/@bus='ide': not supported; use bus='virtio' or bus='sata'",
        "/domain/devices/interface/mac/@address='52-54-00-12-34-56': invalid value: Expected a lower-case MAC",
        "/domain/devices/interface/model/@type='rtl8139': not supported; use type='virtio' or type='e1000'",
    ],
    "bad_many_problems.xml": [
        "/domain/clock: not supported",
        "/domain/os/loader: not supported",
        "/domain/devices/emulator: not supported",
        "/domain/devices/controller: not supported",
        "/domain/devices/input: not supported",
        "/domain/devices/disk/address: not supported; remove it; the engine assigns device addresses",
        "/domain/devices/memballoon/stats: not supported",
    ],
    "bad_not_a_domain.xml": ["/network: not a libvirt domain document"],
}


def refusal(text: str) -> domxml.DomainXmlError:
    with pytest.raises(domxml.DomainXmlError) as caught:
        domxml.spec_from_xml(text)
    return caught.value


def domain(devices: str = "", extra: str = "", os: str = "<type>hvm</type>") -> str:
    """A small valid domain with ``extra`` elements and ``devices`` spliced in."""
    return (
        f"<domain type='kvm'><name>t-1</name><memory unit='MiB'>512</memory>{extra}"
        f"<os>{os}</os><devices>{devices}</devices></domain>"
    )


# -- the samples ----------------------------------------------------------------------------------


def test_sample_tables_cover_every_sample_file() -> None:
    """Pins that every sample file has an expectation and every expectation a file (and there are enough)."""
    files = {path.name for path in SAMPLES.glob("*.xml")}
    assert files == set(EXPECTED) | set(REFUSALS)
    assert len(EXPECTED) >= 10
    assert len(REFUSALS) >= 7


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_good_sample_imports_to_expected_spec(name: str) -> None:
    """Pins the mapping of each good sample to its VmSpec, field by field."""
    spec = domxml.spec_from_xml(sample(name))
    assert type(spec) is VmSpec
    assert msgspec.structs.asdict(spec) == msgspec.structs.asdict(EXPECTED[name])
    assert spec == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_good_sample_survives_export_and_import(name: str) -> None:
    """Pins that exporting an imported sample and importing it again gives the same spec."""
    spec = domxml.spec_from_xml(sample(name))
    assert domxml.spec_from_xml(domxml.spec_to_xml(spec)) == spec


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_bad_sample_is_refused_naming_each_place(name: str) -> None:
    """Pins that each bad sample raises DomainXmlError with a problem naming each refused element or attribute."""
    error = refusal(sample(name))
    for expected in REFUSALS[name]:
        assert any(expected in problem for problem in error.problems), expected
        assert expected in str(error)


def test_every_problem_is_reported_not_just_the_first() -> None:
    """Pins that a document with many problems lists them all in one error, one line each."""
    error = refusal(sample("bad_many_problems.xml"))
    assert len(error.problems) == 7
    assert str(error).startswith("domain XML for 'desk-1' refused (7 problems):\n  - /domain/clock")
    assert str(error).count("\n  - ") == 7


def test_refusal_is_a_value_error_with_problems() -> None:
    """Pins that DomainXmlError is a ValueError carrying the problems as a tuple."""
    error = refusal(sample("bad_hostdev.xml"))
    assert isinstance(error, ValueError)
    assert error.problems == (
        "/domain/devices/hostdev: not supported; remove it; Fleetvisor does not pass host devices through to guests",
    )


# -- import details -------------------------------------------------------------------------------

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("unit", "amount", "mib"),
    [
        ("b", 16 * MIB, 16),
        ("bytes", 16 * MIB + 1, 17),
        ("KB", 16 * MIB, 16_000),
        ("k", 16 * 1024, 16),
        ("KiB", 16 * 1024 + 1, 17),
        ("MB", 1000, 954),
        ("M", 16, 16),
        ("MiB", 512, 512),
        ("GB", 1, 954),
        ("G", 1, 1024),
        ("GiB", 2, 2048),
        ("TB", 1, 953_675),
        ("T", 1, MIB),
        ("TiB", 16, 16 * MIB),
        (None, 524_288, 512),
    ],
)
def test_memory_units_convert_exactly_and_round_up_to_whole_mib(
    unit: str | None, amount: int, mib: int
) -> None:
    """Pins libvirt's memory units (default KiB) and rounding up to a whole MiB with integer arithmetic."""
    unit_attr = "" if unit is None else f" unit='{unit}'"
    text = (
        f"<domain type='kvm'><name>m-1</name><memory{unit_attr}>{amount}</memory>"
        f"<currentMemory{unit_attr}>{amount}</currentMemory><os><type>hvm</type></os></domain>"
    )
    spec = domxml.spec_from_xml(text)
    assert spec.memory_mib == mib
    assert spec.current_memory_mib == mib


@pytest.mark.parametrize(
    ("machine", "family"),
    [
        ("pc", "pc"),
        ("pc-i440fx-7.2", "pc"),
        ("pc-i440fx-rhel7.6.0", "pc"),
        ("q35", "q35"),
        ("pc-q35-7.2", "q35"),
        ("pc-q35-rhel9.2.0", "q35"),
        ("microvm", "microvm"),
    ],
)
def test_versioned_machine_types_map_to_their_family(machine: str, family: str) -> None:
    """Pins that plain and versioned QEMU machine names import as pc, q35 or microvm."""
    spec = domxml.spec_from_xml(domain(os=f"<type machine='{machine}'>hvm</type>"))
    assert spec.machine == family


@pytest.mark.parametrize("machine", ["virt", "isapc", "pc-q35-", "q35-7.2", "pseries"])
def test_other_machine_types_are_refused(machine: str) -> None:
    """Pins that machine types outside pc/q35/microvm are refused, naming the attribute."""
    error = refusal(domain(os=f"<type machine='{machine}'>hvm</type>"))
    assert f"/domain/os/type/@machine='{machine}': not supported; use pc, q35 or microvm" in str(error)


def test_uuid_and_domain_type_are_accepted_but_not_kept() -> None:
    """Pins that uuid, domain id and type='qemu' import, do not change the spec, and export as kvm."""
    plain = domxml.spec_from_xml(domain())
    decorated = domain().replace("<domain type='kvm'>", "<domain type='qemu' id='12'>")
    decorated = decorated.replace(
        "<name>t-1</name>", "<name>t-1</name><uuid>c7a5fdbdedaf9455926ad65c16db1809</uuid>"
    )
    assert domxml.spec_from_xml(decorated) == plain
    assert domxml.spec_to_xml(plain).startswith("<domain type='kvm'>\n")


def test_malformed_uuid_is_refused() -> None:
    """Pins that a uuid that is not 32 hex digits is refused even though it is not kept."""
    text = domain().replace("<name>t-1</name>", "<name>t-1</name><uuid>not-a-uuid</uuid>")
    assert "/domain/uuid: 'not-a-uuid' is not a UUID" in str(refusal(text))


def test_missing_elements_libvirt_needs_are_named_with_an_example() -> None:
    """Pins that missing name, memory, os and disk parts are reported with what to add."""
    error = refusal(
        "<domain type='kvm'><devices><disk type='file'><target dev='sdc'/></disk>"
        "<interface type='bridge'><source/></interface></devices></domain>"
    )
    message = str(error)
    assert "/domain: <name> is missing; add <name>web-1</name>" in message
    assert "/domain: <memory> is missing; add <memory unit='MiB'>512</memory>" in message
    assert "/domain: <os> is missing" in message
    assert "/domain/devices/disk: <driver> is missing (libvirt would then read the image as raw)" in message
    assert "/domain/devices/disk: <source> is missing" in message
    assert "/domain/devices/disk/target: attribute 'bus' is missing" in message
    assert "/domain/devices/interface: <model> is missing" in message
    assert "/domain/devices/interface/source: attribute 'bridge' is missing; add bridge='br0'" in message


def test_current_memory_equal_to_memory_is_kept_as_given() -> None:
    """Pins that currentMemory equal to memory imports as that number, not as None."""
    text = domain(extra="<currentMemory unit='MiB'>512</currentMemory>")
    assert domxml.spec_from_xml(text).current_memory_mib == 512


def test_missing_memballoon_means_a_virtio_balloon_as_in_libvirt() -> None:
    """Pins libvirt's default: no <memballoon> gives balloon=True, model='none' gives False."""
    assert domxml.spec_from_xml(domain()).balloon is True
    assert domxml.spec_from_xml(domain("<memballoon model='none'/>")).balloon is False


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        (
            "<serial type='pty'/><serial type='pty'/>",
            "/domain/devices/serial[2]: <serial> may appear only once",
        ),
        ("<rng model='virtio'/>", "/domain/devices/rng: <backend> is missing"),
        (
            "<rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>",
            "/domain/devices/rng/backend: source '/dev/hwrng' is not supported; use /dev/urandom",
        ),
        ("<console type='tcp'/>", "/domain/devices/console/@type='tcp': not supported; use type='pty'"),
        (
            "<disk type='file'><driver type='raw'/><source file='/a'/><target dev='vda'/></disk>"
            "<disk type='file'><driver type='raw'/><source file='/b'/><target dev='vda'/></disk>",
            "/domain/devices/disk[2]/target/@dev='vda': 2 disks use this target",
        ),
        ("<memballoon model='virtio'>  stray  </memballoon>", "unexpected text 'stray'; remove the text"),
    ],
)
def test_device_problems_are_named(devices: str, expected: str) -> None:
    """Pins the messages for repeated, incomplete or unsupported character, rng, disk and balloon devices."""
    assert expected in str(refusal(domain(devices)))


def test_duplicate_singletons_are_refused() -> None:
    """Pins that an element libvirt allows once (name, features entries) is refused when repeated."""
    text = domain(extra="<features><acpi/><acpi/></features>").replace(
        "<name>t-1</name>", "<name>t-1</name><name>t-2</name>"
    )
    message = str(refusal(text))
    assert "/domain/name[2]: <name> may appear only once here; remove the extra one" in message
    assert "/domain/features/acpi[2]: <acpi> may appear only once here" in message


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (
            "<fleetvisor:disk target='vdz' overlay='no'/>",
            "/domain/metadata/fleetvisor:vm/fleetvisor:disk/@target='vdz': no disk has this target",
        ),
        (
            "<fleetvisor:workload cpu_util='2'/>",
            "/domain/metadata/fleetvisor:vm/fleetvisor:workload/@cpu_util='2': invalid value: Expected `float` <= 1.0",
        ),
        (
            "<fleetvisor:workload boot_s='nan'/>",
            "/domain/metadata/fleetvisor:vm/fleetvisor:workload/@boot_s='nan': not a decimal number",
        ),
        (
            "<fleetvisor:ha enabled='true' priority='1001'/>",
            "fleetvisor:ha/@enabled='true': not supported; use enabled='yes' or enabled='no'",
        ),
        (
            "<fleetvisor:ha priority='1001'/>",
            "fleetvisor:ha/@priority='1001': invalid value: Expected `int` <= 1000",
        ),
        (
            "<fleetvisor:labels><label key='a' value='b'/></fleetvisor:labels>",
            "/domain/metadata/fleetvisor:vm/fleetvisor:labels/label: not supported",
        ),
        (
            "<fleetvisor:labels><fleetvisor:label key='a b' value='c'/></fleetvisor:labels>",
            "fleetvisor:label/@key='a b': invalid value: Expected `str` matching regex",
        ),
        (
            "<fleetvisor:labels><fleetvisor:label key='a' value='1'/><fleetvisor:label key='a' value='2'/>"
            "</fleetvisor:labels>",
            "fleetvisor:label[2]/@key='a': label given twice; keep only one",
        ),
    ],
)
def test_fleetvisor_metadata_problems_are_named(metadata: str, expected: str) -> None:
    """Pins the messages for bad Fleetvisor metadata: unknown disk, out-of-range workload, bad labels."""
    extra = f"<metadata><fleetvisor:vm xmlns:fleetvisor='{domxml.FLEETVISOR_NS}'>{metadata}</fleetvisor:vm></metadata>"
    assert expected in str(refusal(domain(extra=extra)))


def test_comments_and_xml_declaration_are_accepted() -> None:
    """Pins that an XML declaration and comments, which carry no configuration, do not stop an import."""
    text = "<?xml version='1.0' encoding='UTF-8'?>\n<!-- made by hand -->\n" + domain().replace(
        "<os>", "<!-- boot -->\n<os>"
    )
    assert domxml.spec_from_xml(text).name == "t-1"


# -- hostile input --------------------------------------------------------------------------------


def test_oversize_input_is_refused_before_parsing() -> None:
    """Pins the 1 MiB input cap: a larger document is refused without being parsed."""
    padding = "<!--" + "x" * domxml.MAX_XML_BYTES + "-->"
    error = refusal(padding + domain())
    assert "larger than the 1024 KiB limit" in str(error)


@pytest.mark.parametrize(
    "prolog",
    [
        "<!DOCTYPE domain>",
        "<!doctype domain>",
        '<!DOCTYPE domain SYSTEM "http://example.com/domain.dtd">',
        '<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
    ],
)
def test_doctype_declarations_are_refused(prolog: str) -> None:
    """Pins that any DOCTYPE (internal subset, external DTD, entities) is refused before parsing."""
    error = refusal(f"<?xml version='1.0'?>\n{prolog}\n{domain()}")
    assert "line 2: DOCTYPE declarations are refused" in str(error)


def test_lone_surrogate_is_refused_not_a_crash() -> None:
    """Pins that a str holding a lone surrogate gives DomainXmlError, not UnicodeEncodeError."""
    error = refusal(domain().replace("t-1", "t-1\ud800"))
    assert "lone surrogate (U+D800)" in str(error)


def test_deeply_nested_input_is_refused_not_a_crash() -> None:
    """Pins that deep nesting inside an unsupported element is reported, not recursed into."""
    depth = 50_000
    text = domain(extra="<clock>" + "<a>" * depth + "</a>" * depth + "</clock>")
    assert "/domain/clock: not supported" in str(refusal(text))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(EXPECTED)),
    cut=st.integers(min_value=0, max_value=4000),
    insert=st.text(max_size=20),
)
def test_damaged_documents_give_only_domain_xml_errors(name: str, cut: int, insert: str) -> None:
    """Pins that no mangled input escapes as another exception (ParseError, KeyError, ...)."""
    text = sample(name)
    cut = cut % (len(text) + 1)
    damaged = text[:cut] + insert + text[cut + len(insert) // 2 :]
    try:
        spec = domxml.spec_from_xml(damaged)
    except domxml.DomainXmlError as exc:
        assert exc.problems
    else:
        assert isinstance(spec, VmSpec)


# -- export ---------------------------------------------------------------------------------------


def test_export_matches_golden_file() -> None:
    """Pins the exact export format (order, quoting, indentation, escapes) with good_export_full.xml."""
    assert domxml.spec_to_xml(FULL_SPEC) == sample("good_export_full.xml")


def test_export_is_deterministic_and_label_order_free() -> None:
    """Pins that equal specs export to identical text, whatever the order their labels were given in."""
    reordered = msgspec.structs.replace(FULL_SPEC, labels=dict(reversed(list(FULL_SPEC.labels.items()))))
    assert reordered == FULL_SPEC
    assert domxml.spec_to_xml(FULL_SPEC) == domxml.spec_to_xml(FULL_SPEC) == domxml.spec_to_xml(reordered)


def test_export_writes_only_non_default_metadata() -> None:
    """Pins that a spec with default labels, workload, disk_gib and overlays exports no <metadata>."""
    assert "<metadata>" not in domxml.spec_to_xml(VmSpec(name="plain"))
    assert domxml.FLEETVISOR_NS in domxml.spec_to_xml(FULL_SPEC)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            VmSpec(
                name="d-1", disks=[DiskSpec(target="vda", source="/a"), DiskSpec(target="vda", source="/b")]
            ),
            "disks: 2 disks use target 'vda'",
        ),
        (VmSpec(name="d-1", features=["acpi", "acpi"]), "features: 'acpi' is listed 2 times"),
        (VmSpec(name="d-1", cpu_model="Haswell"), "cpu_model: 'Haswell' is set but cpu_mode is 'default'"),
        (VmSpec(name="d-1", boot=BootSpec(cmdline="quiet\x07")), "boot.cmdline: holds the character U+0007"),
        (VmSpec(name="d-1", labels={"k": "\x1b[31m"}), "labels['k']: holds the character U+001B"),
        (VmSpec(name="Not Valid"), "spec: invalid: Expected a VM name"),
    ],
)
def test_export_refuses_specs_xml_cannot_carry(spec: VmSpec, expected: str) -> None:
    """Pins that spec_to_xml raises DomainXmlError, naming the field, rather than write an unfaithful document."""
    with pytest.raises(domxml.DomainXmlError) as caught:
        domxml.spec_to_xml(spec)
    assert expected in str(caught.value)


# -- round trip of random specs -------------------------------------------------------------------

#: Characters XML 1.0 can carry (tab, newline and carriage return included, to exercise escaping).
_XML_CHARS = st.characters(
    exclude_categories=["Cs"],
    exclude_characters=[chr(c) for c in range(0x20) if chr(c) not in "\t\n\r"] + ["\ufffe", "\uffff"],
)
_text = st.text(_XML_CHARS, max_size=30)
_paths = _text.map(lambda rest: "/" + rest)


def _regex(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True)


_disks = st.builds(
    lambda writable, **fields: DiskSpec(
        **fields, writable=writable and not fields["readonly"] and not fields["overlay"]
    ),
    target=_regex(r"(vd|sd|hd)[a-z]{1,2}"),
    source=_paths,
    format=st.sampled_from(["qcow2", "raw"]),
    bus=st.sampled_from(["virtio", "sata"]),
    readonly=st.booleans(),
    overlay=st.booleans(),
    writable=st.booleans(),
)
_nics = st.builds(
    NicSpec,
    model=st.sampled_from(["virtio", "e1000"]),
    mode=st.sampled_from(["user", "tap", "bridge"]),
    mac=st.none() | _regex(r"([0-9a-f]{2}:){5}[0-9a-f]{2}"),
    device=st.none() | _regex(r"[A-Za-z0-9_.-]{1,15}"),
)


@st.composite
def valid_specs(draw: st.DrawFn) -> VmSpec:
    """Any spec VmSpecInput accepts, less the few with no faithful XML form (see spec_to_xml)."""
    cpu_mode = draw(st.sampled_from(typing.get_args(vmspec.CpuMode)))
    spec = VmSpec(
        name=draw(_regex(vmspec.VM_NAME_PATTERN)),
        vcpus=draw(st.integers(1, 512)),
        memory_mib=draw(st.integers(16, 16 * MIB)),
        disk_gib=draw(st.integers(0, MIB)),
        arch=draw(st.sampled_from(typing.get_args(vmspec.Arch))),
        labels=draw(
            st.dictionaries(_regex(r"[A-Za-z0-9._/-]{1,63}"), st.text(_XML_CHARS, max_size=256), max_size=4)
        ),
        workload=draw(
            st.builds(
                VmWorkload,
                cpu_util=st.floats(0.0, 1.0),
                dirty_mib_s=st.floats(0.0, 100_000.0),
                boot_s=st.floats(0.0, 600.0),
            )
        ),
        machine=draw(st.sampled_from(typing.get_args(vmspec.Machine))),
        cpu_mode=cpu_mode,
        cpu_model="" if cpu_mode == "default" else draw(_regex(r"[A-Za-z0-9_.-]{0,64}")),
        current_memory_mib=draw(st.none() | st.integers(16, 16 * 1024 * 1024)),
        boot=draw(st.builds(BootSpec, kernel=st.none() | _paths, initrd=st.none() | _paths, cmdline=_text)),
        disks=draw(st.lists(_disks, max_size=4, unique_by=lambda disk: disk.target)),
        nics=draw(st.lists(_nics, max_size=4)),
        features=draw(st.lists(st.sampled_from(typing.get_args(vmspec.Feature)), unique=True)),
        console=draw(st.booleans()),
        rng=draw(st.booleans()),
        balloon=draw(st.booleans()),
        ha=draw(st.booleans()),
        ha_priority=draw(st.integers(0, 1000)),
    )
    # The strategy must only make specs an operator could submit.
    msgspec.convert(msgspec.to_builtins(spec), vmspec.VmSpecInput)
    return spec


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=valid_specs())
def test_random_valid_specs_round_trip(spec: VmSpec) -> None:
    """Pins spec_from_xml(spec_to_xml(s)) == s for random valid specs, and that re-export is identical."""
    text = domxml.spec_to_xml(spec)
    back = domxml.spec_from_xml(text)
    assert back == spec
    assert domxml.spec_to_xml(back) == text


def test_every_spec_field_has_an_xml_home() -> None:
    """Pins that XML_HOME (and so the mapping tests) covers exactly the fields of VmSpec and its parts."""
    for struct, homes in XML_HOME.items():
        assert [f.name for f in msgspec.structs.fields(struct)] == list(homes), struct.__name__


def test_full_spec_sets_every_field_away_from_its_default() -> None:
    """Pins that the golden FULL_SPEC exercises each field (only arch and the on-by-default booleans keep defaults)."""
    defaults = VmSpec(name="x")
    left_default = {
        f.name
        for f in msgspec.structs.fields(VmSpec)
        if getattr(FULL_SPEC, f.name) == getattr(defaults, f.name)
    }
    assert left_default == {"arch", "console", "rng", "balloon"}


def test_round_trip_keeps_whitespace_and_markup_in_text() -> None:
    """Pins that carriage returns, tabs, newlines, quotes and <&> in paths, cmdline and labels survive."""
    tricky = "a\r\nb\tc 'd' \"e\" <f> & g\r"
    spec = VmSpec(
        name="w-1",
        labels={"k": tricky},
        boot=BootSpec(kernel="/k " + tricky, cmdline=" " + tricky + " "),
        disks=[DiskSpec(target="vda", source="/d" + tricky)],
    )
    assert domxml.spec_from_xml(domxml.spec_to_xml(spec)) == spec


def test_sample_names_follow_the_convention() -> None:
    """Pins the sample naming rule the tables rely on: good_*.xml imports, bad_*.xml is refused."""
    assert all(re.fullmatch(r"good_[a-z0-9_]+\.xml", name) for name in EXPECTED)
    assert all(re.fullmatch(r"bad_[a-z0-9_]+\.xml", name) for name in REFUSALS)
