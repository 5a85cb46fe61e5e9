"""Host introspection and the accelerator choice: cpuinfo, QEMU's own answers, the cached KVM probe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import msgspec
import pytest

from hv.driver import EngineError
from hv.qemu import accel, host
from tests.hv.qemu.conftest import MakeDriver
from tests.support.needs import missing, needs
from tests.support.qemu import Guests, qemu_skip_reason

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = needs(QEMU, qemu_skip_reason() or "qemu-system-x86_64 is not installed")

INTEL = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags		: fpu vme pae lm nx vmx sse4_2 avx avx2 x2apic hypervisor aes
vmx flags	: vnmi preemption_timer invvpid ept_x_only ept_ad ept_1gb flexpriority tsc_offset vtpr mtf vapic \
ept vpid unrestricted_guest

processor	: 1
vendor_id	: GenuineIntel
flags		: fpu something_else
"""

AMD = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7502 32-Core Processor
flags		: fpu pae lm nx svm npt nrip_save avic sse4_2 avx2
"""


def proc_text(name: str) -> str:
    return Path("/proc", name).read_text()


def qemu_version_output() -> str:
    assert QEMU is not None
    return subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True, timeout=30).stdout


def test_cpuinfo_gives_vendor_model_and_the_virtualisation_features() -> None:
    """VMX/EPT/VPID/vTPR from Intel's two flag lines, SVM/NPT/AVIC from AMD's; only the first CPU counts."""
    intel = host.parse_cpuinfo(INTEL)
    assert (intel.vendor, intel.model) == ("GenuineIntel", "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz")
    features = host.reported_cpu_features(intel.flags)
    for flag in ("vmx", "ept", "vpid", "ept_ad", "vtpr", "flexpriority", "unrestricted_guest", "lm", "avx2"):
        assert flag in features
    assert "something_else" not in intel.flags and "preemption_timer" not in features
    amd = host.reported_cpu_features(host.parse_cpuinfo(AMD).flags)
    assert {"svm", "npt", "avic", "nrip_save"} <= set(amd) and "vmx" not in amd


def test_meminfo_and_guest_arches(tmp_path: Path) -> None:
    """MemTotal in MiB; one arch per qemu-system-* binary (variants skipped), plus i386 with x86_64."""
    assert host.parse_meminfo_mib("MemTotal:       24731648 kB\nMemFree: 1 kB\n") == 24152
    for name in ("qemu-system-x86_64", "qemu-system-aarch64", "qemu-system-x86_64-microvm", "qemu-img"):
        binary = tmp_path / name
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    assert host.guest_arches(tmp_path) == ["aarch64", "i386", "x86_64"]


@needs_qemu
async def test_qemu_introspection_reports_version_machines_and_sandbox_and_is_cached(tmp_path: Path) -> None:
    """QEMU says its version (as --version does), its machine types, its CPU models and -sandbox works."""
    assert QEMU is not None
    cache = tmp_path / "qemu-info.json"
    info = await host.introspect_qemu(Path(QEMU), cache)
    assert f"version {info.version}" in qemu_version_output()
    assert {"pc", "q35", "microvm"} <= set(info.machine_types)
    assert "max" in info.cpu_models and info.sandbox is True
    assert cache.exists()
    # Mark the cached answer: only a reply read from the cache can carry the mark (QEMU never says it).
    record = json.loads(cache.read_text())
    record["info"]["package"] = "from-the-cache"
    cache.write_text(json.dumps(record))
    again = await host.introspect_qemu(Path(QEMU), cache)
    assert again == msgspec.structs.replace(info, package="from-the-cache"), (
        "the second answer is the cache's"
    )


@needs_qemu
async def test_the_kvm_probe_decides_by_itself_and_caches_its_verdict(tmp_path: Path) -> None:
    """auto: the probe guest decides (TCG on a host without VMX/SVM, e.g. paravirtual KVM); cached after."""
    assert QEMU is not None
    info = await host.introspect_qemu(Path(QEMU), None)
    cache = tmp_path / "accel-probe.json"
    options = dict(
        binary=Path(QEMU), qemu_version=info.version, machine_types=info.machine_types, sandbox=True,
        work_dir=tmp_path, cache_file=cache,
    )  # fmt: skip
    begun = time.monotonic()
    choice = await accel.choose_accel("auto", **options)  # type: ignore[arg-type]
    # The probe gives up after its own timeout_s (1.5 s). This bound only tells "gave up" from "hung":
    # ten times the 3 s this test once asserted, room for a loaded 2-core CI machine starting QEMU.
    assert time.monotonic() - begun < 30.0, "the probe gives up on a broken KVM"
    flags = host.parse_cpuinfo(proc_text("cpuinfo")).flags
    if not os.access("/dev/kvm", os.F_OK):
        assert choice.accel == "tcg" and "does not exist" in choice.reason
        return
    assert choice.probed
    if not flags & {"vmx", "svm"}:
        assert choice.accel == "tcg", f"no VMX/SVM here, so KVM cannot run guests at speed: {choice.reason}"
        assert "did not answer" in choice.reason or "failed" in choice.reason
    assert cache.exists()
    # With no QEMU to run, only the cached verdict can answer (a new probe would say "could not run").
    no_qemu = {**options, "binary": Path("/nonexistent/qemu")}
    again = await accel.choose_accel("auto", **no_qemu)  # type: ignore[arg-type]
    assert again.accel == choice.accel and "cached probe" in again.reason, again.reason


async def test_a_cached_verdict_counts_only_for_the_same_kernel_qemu_and_probe(tmp_path: Path) -> None:
    """A record with this host's key is used as it is; one from another kernel or QEMU is ignored."""
    cache = tmp_path / "accel-probe.json"
    key = accel.cache_key(os.uname().release, "7.2.0")
    record = {"key": key, "kvm_works": True, "detail": "it ran", "probe_ms": 30, "at": 0.0}
    cache.write_bytes(msgspec.json.encode(record))
    options = dict(
        binary=Path("/nonexistent/qemu"), machine_types=["pc"], sandbox=True, work_dir=tmp_path, cache_file=cache,
    )  # fmt: skip
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        # A plain skip even under CI: /dev/kvm is the machine's hardware, which no package provides
        # and which CI runners (often VMs without nested virtualisation) may lack.
        pytest.skip("needs an accessible /dev/kvm to get past the device check")
    choice = await accel.choose_accel("auto", qemu_version="7.2.0", **options)  # type: ignore[arg-type]
    assert (choice.accel, choice.probed) == ("kvm", True) and "cached probe" in choice.reason
    other = await accel.choose_accel("auto", qemu_version="8.0.0", **options)  # type: ignore[arg-type]
    assert other.accel == "tcg" and "could not run /nonexistent/qemu" in other.reason


async def test_the_overrides_skip_the_probe_and_kvm_needs_the_device(tmp_path: Path) -> None:
    """accel=tcg never probes; accel=kvm trusts the operator but needs /dev/kvm; auto without it is TCG."""
    options = dict(
        binary=Path("/nonexistent/qemu"), qemu_version="7.2.0", machine_types=["pc"], sandbox=True,
        work_dir=tmp_path, cache_file=tmp_path / "accel-probe.json", kvm_device=tmp_path / "no-kvm",
    )  # fmt: skip
    tcg = await accel.choose_accel("tcg", **options)  # type: ignore[arg-type]
    assert tcg.accel == "tcg" and not tcg.probed
    with pytest.raises(EngineError, match=r"accel=kvm.*no-kvm does not exist.*accel=auto"):
        await accel.choose_accel("kvm", **options)  # type: ignore[arg-type]
    auto = await accel.choose_accel("auto", **options)  # type: ignore[arg-type]
    assert auto.accel == "tcg" and "does not exist" in auto.reason
    assert not (tmp_path / "accel-probe.json").exists()


@needs_qemu
def test_the_probe_guest_itself_works_under_tcg(tmp_path: Path) -> None:
    """The probe guest prints its marker under TCG, so a KVM failure is KVM's, not the guest's."""
    assert QEMU is not None
    guest = tmp_path / "probe.bin"
    guest.write_bytes(accel.KVM_PROBE_GUEST)
    with subprocess.Popen(
        [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-machine", "microvm", "-accel", "tcg",
         "-cpu", "max", "-m", "32", "-kernel", str(guest), "-serial", "stdio"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    ) as qemu:  # fmt: skip
        try:
            assert qemu.stdout is not None
            seen = b""
            deadline = time.monotonic() + 20
            while accel.KVM_PROBE_MARKER not in seen and time.monotonic() < deadline:
                chunk = os.read(qemu.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
            assert accel.KVM_PROBE_MARKER in seen
        finally:
            qemu.kill()


@needs(shutil.which("as") and shutil.which("ld"), "binutils (as, ld) missing (apt-get install -y binutils)")
def test_the_embedded_probe_guest_is_kvm_probe_s_assembled(tmp_path: Path) -> None:
    """KVM_PROBE_GUEST is exactly what hv/qemu/kvm_probe.S assembles to (the source is the truth)."""
    source = Path(accel.__file__).with_name("kvm_probe.S")
    if not source.exists():
        missing(f"{source} is not installed with the package (run from a source checkout, as CI does)")
    subprocess.run(["as", "--32", "-o", str(tmp_path / "p.o"), str(source)], check=True, timeout=30)
    subprocess.run(
        ["ld", "-m", "elf_i386", "-Ttext=0x100000", "--oformat=binary", "-e", "_start",
         "-o", str(tmp_path / "p.bin"), str(tmp_path / "p.o")],
        check=True, timeout=30,
    )  # fmt: skip
    assert (tmp_path / "p.bin").read_bytes() == accel.KVM_PROBE_GUEST


async def test_capabilities_describe_this_host_and_its_qemu(make_driver: MakeDriver, guests: Guests) -> None:
    """Engine qemu with QEMU's version, the probed accel, host cores/memory, x86 guests, machine types."""
    driver = await make_driver()
    caps = await driver.capabilities()
    assert caps.engine == "qemu" and driver.qemu_info is not None
    assert caps.engine_version == driver.qemu_info.version
    assert driver.accel is not None and caps.accel == driver.accel.accel
    assert caps.arch == os.uname().machine and caps.cores == os.cpu_count()
    assert caps.memory_mib == host.parse_meminfo_mib(proc_text("meminfo"))
    assert {"x86_64", "i386"} <= set(caps.guest_arches)
    assert {"pc", "q35", "microvm"} <= set(caps.machine_types)
    assert caps.cpu_vendor == host.parse_cpuinfo(proc_text("cpuinfo")).vendor
