"""The QEMU command line built from a spec: machines, devices, disks, NICs, boot, sandbox. Pure, no QEMU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hv.qemu.command_line import (
    DiskPlan,
    LaunchPlan,
    build_argv,
    cpu_model_for,
    mac_address,
    spec_problems,
)
from hv.qemu.image_policy import ImageLayer
from protocols.vmspec import BootSpec, DiskSpec, NicSpec, VmSpec

VM_DIR = Path("/var/lib/fv/vms/web-1")
KERNEL = Path("/images/vmlinux")
MACHINES = ["pc", "q35", "microvm", "pc-i440fx-7.2"]


def spec(**fields: object) -> VmSpec:
    fields.setdefault("boot", BootSpec(kernel=str(KERNEL), cmdline="console=ttyS0"))
    return VmSpec(name="web-1", **fields)  # type: ignore[arg-type]


def plan(vm: VmSpec, *, accel: str = "tcg", disks: tuple[DiskPlan, ...] = (), **fields: object) -> LaunchPlan:
    kernel = KERNEL if vm.boot.kernel else None
    return LaunchPlan(spec=vm, accel=accel, vm_dir=VM_DIR, kernel=kernel, disks=disks, **fields)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def devices(argv: list[str]) -> list[str]:
    return [d.split(",")[0] for d in option(argv, "-device")]


def disk(target: str, *layers: tuple[str, str], **fields: object) -> DiskPlan:
    return DiskPlan(
        spec=DiskSpec(target=target, source=layers[-1][0], **fields),  # type: ignore[arg-type]
        layers=tuple(ImageLayer(path=Path(p), format=f, virtual_size=1 << 30) for p, f in layers),  # type: ignore[arg-type]
    )


def test_pc_gets_pci_virtio_devices_and_the_safe_defaults() -> None:
    """pc: -nodefaults, no user config, no display, sandbox, QMP on fd 3, serial to a file, virtio-*-pci."""
    argv = build_argv("/usr/bin/qemu-system-x86_64", plan(spec(nics=[NicSpec()])))
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert option(argv, "-display") == ["none"]
    assert option(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert option(argv, "-machine") == ["pc"]
    assert option(argv, "-accel") == ["tcg"] and option(argv, "-cpu") == ["max"]
    assert "socket,id=qmp,fd=3,server=on,wait=off" in option(argv, "-chardev")
    assert f"file,id=serial0,path={VM_DIR}/serial.log" in option(argv, "-chardev")
    assert option(argv, "-pidfile") == [f"{VM_DIR}/qemu.pid"]
    assert devices(argv) == [
        "virtio-net-pci", "virtio-serial-pci", "virtconsole", "virtio-rng-pci", "virtio-balloon-pci",
    ]  # fmt: skip
    assert option(argv, "-object") == ["rng-builtin,id=rng0"], "no host entropy file is opened"


def test_q35_uses_pci_too_and_features_without_acpi_turn_it_off() -> None:
    """q35 takes the same PCI devices; a spec without the acpi feature gets acpi=off."""
    argv = build_argv("qemu", plan(spec(machine="q35", features=["apic"])))
    assert option(argv, "-machine") == ["q35,acpi=off"]
    assert "virtio-balloon-pci" in devices(argv)


def test_microvm_gets_virtio_mmio_devices_and_no_pci() -> None:
    """Microvm has no PCI: every virtio device is the -device (virtio-mmio) flavour."""
    vm = spec(
        machine="microvm",
        nics=[NicSpec()],
        disks=[DiskSpec(target="vda", source="/images/a.raw", format="raw")],
    )
    argv = build_argv("qemu", plan(vm, disks=(disk("vda", ("/images/a.raw", "raw")),)))
    assert option(argv, "-machine") == ["microvm"]
    assert devices(argv) == [
        "virtio-blk-device", "virtio-net-device", "virtio-serial-device", "virtconsole",
        "virtio-rng-device", "virtio-balloon-device",
    ]  # fmt: skip
    assert not any("pci" in d for d in devices(argv))


def test_direct_kernel_boot_passes_kernel_initrd_and_command_line() -> None:
    """boot.kernel/initrd/cmdline become -kernel/-initrd/-append, with the checked paths."""
    vm = spec(boot=BootSpec(kernel=str(KERNEL), initrd="/images/initrd", cmdline="console=ttyS0 quiet"))
    argv = build_argv("qemu", plan(vm, initrd=Path("/images/initrd")))
    assert option(argv, "-kernel") == [str(KERNEL)]
    assert option(argv, "-initrd") == ["/images/initrd"]
    assert option(argv, "-append") == ["console=ttyS0 quiet"]


def test_disk_boot_marks_the_first_disk_bootable_and_sizes_cpus_and_memory() -> None:
    """Without a kernel the disks get boot indexes in order; -smp and -m follow the spec."""
    vm = spec(
        boot=BootSpec(),
        vcpus=2,
        memory_mib=768,
        disks=[
            DiskSpec(target="vda", source="/images/a.qcow2"),
            DiskSpec(target="vdb", source="/images/b.raw", format="raw"),
        ],
    )
    argv = build_argv(
        "qemu",
        plan(
            vm,
            disks=(
                disk("vda", ("/images/a.qcow2", "qcow2")),
                disk("vdb", ("/images/b.raw", "raw"), format="raw"),
            ),
        ),
    )
    assert "-kernel" not in argv
    blk = [d for d in option(argv, "-device") if d.startswith("virtio-blk-pci")]
    assert blk == [
        "virtio-blk-pci,drive=vda-fmt0,id=disk-vda,bootindex=1",
        "virtio-blk-pci,drive=vdb-fmt0,id=disk-vdb,bootindex=2",
    ]
    assert option(argv, "-smp") == ["2"] and option(argv, "-m") == ["768M"]


def test_an_overlay_chain_becomes_explicit_blockdevs_with_no_implicit_backing() -> None:
    """Overlay -> base: every layer is a -blockdev node; the base's backing is null; only the top writes."""
    vm = spec(disks=[DiskSpec(target="vda", source="/images/base.qcow2")])
    chain = disk("vda", (f"{VM_DIR}/disk-vda.qcow2", "qcow2"), ("/images/base.qcow2", "qcow2"))
    argv = build_argv("qemu", plan(vm, disks=(chain,)))
    nodes = [json.loads(b) for b in option(argv, "-blockdev")]

    def file_node(path: str, level: int, read_only: bool) -> dict[str, object]:
        return {
            "driver": "file", "filename": path, "node-name": f"vda-file{level}", "read-only": read_only,
            "discard": "unmap",
        }  # fmt: skip

    assert nodes == [
        file_node("/images/base.qcow2", 1, True),
        {"driver": "qcow2", "file": "vda-file1", "node-name": "vda-fmt1", "read-only": True, "backing": None},
        file_node(f"{VM_DIR}/disk-vda.qcow2", 0, False),
        {
            "driver": "qcow2",
            "file": "vda-file0",
            "node-name": "vda-fmt0",
            "read-only": False,
            "backing": "vda-fmt1",
        },
    ]
    assert "virtio-blk-pci,drive=vda-fmt0,id=disk-vda" in option(argv, "-device")


def test_a_readonly_disk_is_read_only_at_every_layer() -> None:
    """readonly=True: the top node is read-only too."""
    vm = spec(
        disks=[DiskSpec(target="vda", source="/images/a.raw", format="raw", readonly=True, overlay=False)]
    )
    argv = build_argv(
        "qemu", plan(vm, disks=(disk("vda", ("/images/a.raw", "raw"), format="raw", readonly=True),))
    )
    nodes = [json.loads(b) for b in option(argv, "-blockdev")]
    assert all(node["read-only"] for node in nodes)
    assert "backing" not in nodes[1], "raw has no backing option"


@pytest.mark.parametrize(("writable", "read_only"), [(False, True), (True, False)])
def test_a_disk_without_an_overlay_is_read_only_unless_the_spec_says_writable(
    writable: bool, read_only: bool
) -> None:
    """overlay=False opens the (possibly shared) image itself: read-only, unless writable=True."""
    vm = spec(disks=[DiskSpec(target="vdb", source="/images/shared.raw", format="raw", overlay=False)])
    fields: dict[str, object] = {"format": "raw", "overlay": False, "writable": writable}
    argv = build_argv("qemu", plan(vm, disks=(disk("vdb", ("/images/shared.raw", "raw"), **fields),)))
    nodes = [json.loads(b) for b in option(argv, "-blockdev")]
    assert [node["read-only"] for node in nodes] == [read_only, read_only]


def test_sata_disks_share_one_ahci_controller() -> None:
    """bus=sata: one ahci controller, one ide-hd per disk on consecutive ports."""
    vm = spec(
        disks=[
            DiskSpec(target="sda", source="/images/a.qcow2", bus="sata"),
            DiskSpec(target="sdb", source="/images/b.qcow2", bus="sata"),
        ]
    )
    chains = (
        disk("sda", ("/images/a.qcow2", "qcow2"), bus="sata"),
        disk("sdb", ("/images/b.qcow2", "qcow2"), bus="sata"),
    )
    argv = build_argv("qemu", plan(vm, disks=chains))
    sata = [d for d in option(argv, "-device") if d.startswith(("ahci", "ide-hd"))]
    assert sata == [
        "ahci,id=sata0",
        "ide-hd,bus=sata0.0,drive=sda-fmt0,id=disk-sda",
        "ide-hd,bus=sata0.1,drive=sdb-fmt0,id=disk-sdb",
    ]


def test_nics_user_tap_and_bridge_with_stable_macs() -> None:
    """user/tap/bridge backends; e1000 or virtio models; MACs stable per VM and NIC unless given."""
    vm = spec(
        nics=[
            NicSpec(),
            NicSpec(mode="tap", device="tap7", model="e1000"),
            NicSpec(mode="bridge", device="br0", mac="52:54:00:aa:bb:cc"),
        ]
    )
    argv = build_argv("qemu", plan(vm))
    assert option(argv, "-netdev") == [
        "user,id=net0",
        "tap,id=net1,ifname=tap7,script=no,downscript=no",
        "bridge,id=net2,br=br0",
    ]
    nics = [d for d in option(argv, "-device") if "netdev=" in d]
    assert nics == [
        f"virtio-net-pci,netdev=net0,mac={mac_address('web-1', 0)},id=nic0",
        f"e1000,netdev=net1,mac={mac_address('web-1', 1)},id=nic1",
        "virtio-net-pci,netdev=net2,mac=52:54:00:aa:bb:cc,id=nic2",
    ]
    assert mac_address("web-1", 0) == mac_address("web-1", 0) != mac_address("web-2", 0)
    sandbox = option(argv, "-sandbox")[0]
    assert "spawn=allow" in sandbox and "elevateprivileges=children" in sandbox, "the bridge helper may run"


def test_sandbox_can_be_left_out_and_optional_devices_dropped() -> None:
    """sandbox=False drops -sandbox; console/rng/balloon off drop their devices."""
    argv = build_argv("qemu", plan(spec(console=False, rng=False, balloon=False), sandbox=False))
    assert "-sandbox" not in argv
    assert devices(argv) == [] and "-object" not in argv


@pytest.mark.parametrize(
    ("mode", "accel", "expected"),
    [
        ("default", "tcg", "max"),
        ("host-passthrough", "tcg", "max"),
        ("host-passthrough", "kvm", "host"),
        ("host-model", "kvm", "max"),
    ],
)
def test_cpu_model_uses_host_only_for_passthrough_under_kvm(mode: str, accel: str, expected: str) -> None:
    """-cpu host needs KVM; everything else gets max, and custom gets the named model."""
    assert cpu_model_for(spec(cpu_mode=mode), accel) == expected
    assert cpu_model_for(spec(cpu_mode="custom", cpu_model="Skylake-Server"), accel) == "Skylake-Server"


def test_a_comma_in_a_runtime_path_is_escaped_for_qemus_option_syntax() -> None:
    """A state directory with a comma cannot inject chardev options."""
    weird = LaunchPlan(spec=spec(), accel="tcg", vm_dir=Path("/srv/a,b/vms/web-1"), kernel=KERNEL)
    assert "file,id=serial0,path=/srv/a,,b/vms/web-1/serial.log" in option(
        build_argv("qemu", weird), "-chardev"
    )


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (
            {"machine": "microvm", "disks": [DiskSpec(target="sda", source="/i/a", bus="sata")]},
            "no PCI, so no SATA",
        ),
        ({"machine": "microvm", "nics": [NicSpec(model="e1000")]}, "no PCI for an e1000"),
        (
            {"disks": [DiskSpec(target="sda", source="/i/a", bus="sata", readonly=True)]},
            "cannot be read-only",
        ),
        (
            {"disks": [DiskSpec(target="sda", source="/i/a", bus="sata", overlay=False)]},
            "or set writable: true if this VM alone owns the image",
        ),
        (
            {"disks": [DiskSpec(target="vda", source="/i/a"), DiskSpec(target="vda", source="/i/b")]},
            "used twice",
        ),
        ({"nics": [NicSpec(mode="tap")]}, "needs device=<tap device name>"),
        ({"boot": BootSpec()}, "nothing to boot"),
        ({"boot": BootSpec(initrd="/i/initrd")}, "boot.initrd needs boot.kernel"),
        ({"boot": BootSpec(kernel="/i/a,b")}, "comma"),
        ({"cpu_mode": "custom"}, "needs a cpu_model"),
        ({"cpu_mode": "custom", "cpu_model": "Nehalem-9000"}, "unknown to this QEMU"),
        ({"memory_mib": 256, "current_memory_mib": 512}, "exceeds memory_mib"),
    ],
)
def test_spec_problems_explain_what_qemu_cannot_do(fields: dict[str, object], problem: str) -> None:
    """Impossible device combinations are refused before anything is created, with the fix."""
    problems = spec_problems(spec(**fields), machine_types=MACHINES, cpu_models=["max", "Skylake-Server"])
    assert any(problem in p for p in problems), problems


def test_a_plain_spec_has_no_problems() -> None:
    """The defaults (pc, virtio, kernel boot) are fine."""
    assert spec_problems(spec(nics=[NicSpec()]), machine_types=MACHINES, cpu_models=[]) == []


def test_a_writable_sata_disk_without_an_overlay_has_no_problem() -> None:
    """A SATA disk on its own image, marked writable, is something ide-hd can carry."""
    disks = [DiskSpec(target="sda", source="/i/own.raw", bus="sata", overlay=False, writable=True)]
    assert spec_problems(spec(disks=disks), machine_types=MACHINES, cpu_models=[]) == []
