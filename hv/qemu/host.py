"""What this host and its QEMU can do: CPU, memory, QEMU version, machine types, sandbox support.

The parsers (:func:`parse_cpuinfo`, :func:`parse_meminfo_mib`, :func:`guest_arches`) are pure.
:func:`introspect_qemu` asks QEMU itself, once: it starts ``qemu-system-x86_64 -machine none`` with
``-sandbox on`` and a QMP monitor on one end of a socket pair, runs ``query-version``,
``query-machines`` and ``query-cpu-definitions``, and quits (about 50 ms). A QEMU built without
seccomp refuses ``-sandbox``; that is detected here, not assumed. The answer is cached in a file
keyed by the binary's path, size and modification time.

Imports: :mod:`hv.driver` (errors), :mod:`hv.storage` and :mod:`hv.qemu.qmp` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from hv.driver import EngineError
from hv.qemu.qmp import QmpSession
from hv.storage import write_atomic

__all__ = [
    "SANDBOX_OPTIONS",
    "CpuInfo",
    "QemuInfo",
    "guest_arches",
    "introspect_qemu",
    "parse_cpuinfo",
    "parse_meminfo_mib",
    "reported_cpu_features",
]

log = logging.getLogger(__name__)

#: QEMU's seccomp sandbox: no obsolete syscalls, no setuid, no fork/exec, no resource changes.
SANDBOX_OPTIONS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

#: CPU flags worth reporting: hardware virtualisation and its helpers (VMX/SVM, EPT/NPT, VPID,
#: the virtual TPR and APIC), then what guests and migration compatibility care about most.
_VIRT_FEATURES = (
    "vmx", "svm", "ept", "npt", "vpid", "ept_ad", "ept_1gb", "ept_x_only", "ept_5level",
    "unrestricted_guest", "vmx_unrestricted_guest", "flexpriority", "tpr_shadow", "vtpr", "vnmi",
    "apicv", "avic", "x2avic", "nrip_save", "decodeassists", "flushbyasid", "v_vmsave_vmload",
    "vgif", "posted_intr", "pml", "vmfunc", "hypervisor",
)  # fmt: skip
_GUEST_FEATURES = (
    "lm", "pae", "nx", "pdpe1gb", "x2apic", "constant_tsc", "nonstop_tsc", "tsc_deadline_timer",
    "sse4_2", "avx", "avx2", "avx512f", "aes", "rdrand", "rdseed", "sha_ni", "pcid", "invpcid",
    "smep", "smap", "pku", "la57",
)  # fmt: skip
REPORTED_FEATURES = _VIRT_FEATURES + _GUEST_FEATURES

#: The guest architectures this engine builds machines for; other qemu-system-* binaries are
#: listed by :func:`guest_arches` but not offered to the scheduler.
SUPPORTED_ARCHES = ("x86_64", "i386")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """The host CPU as /proc/cpuinfo describes it."""

    vendor: str
    model: str
    #: ``flags`` plus the ``vmx flags`` line newer kernels print separately (ept, vpid, ...).
    flags: frozenset[str]


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's vendor, model name and flags from ``/proc/cpuinfo`` text."""
    vendor = model = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if not line.strip():
            if vendor or flags:
                break  # end of the first processor's block
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "vendor_id":
            vendor = value
        elif key == "model name":
            model = value
        elif key in ("flags", "vmx flags", "Features"):
            flags.update(value.split())
    return CpuInfo(vendor=vendor, model=model, flags=frozenset(flags))


def reported_cpu_features(flags: Iterable[str]) -> list[str]:
    """The flags of :data:`REPORTED_FEATURES` the host has, in that order."""
    present = set(flags)
    return [flag for flag in REPORTED_FEATURES if flag in present]


def parse_meminfo_mib(text: str) -> int:
    """``MemTotal`` from ``/proc/meminfo`` text, in MiB.

    Raises:
        ValueError: there is no MemTotal line.
    """
    match = re.search(r"^MemTotal:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise ValueError("no MemTotal line in /proc/meminfo")
    return int(match.group(1)) // 1024


def guest_arches(binary_dir: Path) -> list[str]:
    """One arch per ``qemu-system-ARCH`` binary in ``binary_dir``, plus i386 where x86_64 is.

    Variants such as ``qemu-system-x86_64-microvm`` are not architectures and are left out.
    """
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for entry in binary_dir.iterdir():
            name = entry.name
            if not name.startswith("qemu-system-"):
                continue
            arch = name.removeprefix("qemu-system-")
            if arch and "-" not in arch and os.access(entry, os.X_OK):
                found.add(arch)
    if "x86_64" in found:
        found.add("i386")
    if "ppc64" in found:
        found.add("ppc64le")
    return sorted(found)


class QemuInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What one QEMU binary offers, as QEMU itself reports it."""

    binary: str
    version: str
    package: str = ""
    #: Every machine type name and alias (``pc``, ``q35``, ``microvm``, ``pc-i440fx-7.2``, ...).
    machine_types: list[str]
    cpu_models: list[str]
    sandbox: bool


class _CachedInfo(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    info: QemuInfo


def _binary_key(binary: Path) -> str:
    st = binary.stat()
    return f"{binary}:{st.st_size}:{st.st_mtime_ns}"


async def introspect_qemu(binary: Path, cache_file: Path | None, timeout_s: float = 10.0) -> QemuInfo:
    """Ask ``binary`` for its version, machine types and CPU models, and whether -sandbox works.

    Raises:
        EngineError: the binary is missing or does not answer over QMP.
    """
    try:
        key = _binary_key(binary)
    except OSError as exc:
        raise EngineError(
            f"qemu binary {binary} is not usable: {exc.strerror or exc}; "
            "install QEMU (apt-get install -y qemu-system-x86) or pass qemu_binary="
        ) from exc
    cached = _read_cached(cache_file, key)
    if cached is not None:
        return cached
    sandbox = True
    try:
        answers = await _ask_qemu(binary, sandbox=True, timeout_s=timeout_s)
    except _SandboxUnsupported:
        sandbox = False
        answers = await _ask_qemu(binary, sandbox=False, timeout_s=timeout_s)
    version_info, machines, cpus = answers
    info = QemuInfo(
        binary=str(binary),
        version=_version_string(version_info),
        package=str(version_info.get("package", "")).strip(),
        machine_types=sorted(
            {m["name"] for m in machines if m.get("name") != "none"}
            | {m["alias"] for m in machines if m.get("alias")}
        ),
        cpu_models=sorted({c["name"] for c in cpus if isinstance(c.get("name"), str)}),
        sandbox=sandbox,
    )
    if cache_file is not None:
        with contextlib.suppress(OSError):
            write_atomic(cache_file, msgspec.json.encode(_CachedInfo(key=key, info=info)))
    return info


def _read_cached(cache_file: Path | None, key: str) -> QemuInfo | None:
    if cache_file is None:
        return None
    with contextlib.suppress(OSError, msgspec.DecodeError):
        cached = msgspec.json.decode(cache_file.read_bytes(), type=_CachedInfo)
        if cached.key == key:
            return cached.info
    return None


class _SandboxUnsupported(Exception):
    pass


async def _ask_qemu(
    binary: Path, *, sandbox: bool, timeout_s: float
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [
        str(binary), "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
        "-chardev", f"socket,id=monitor,fd={theirs.fileno()}", "-mon", "chardev=monitor,mode=control",
    ]  # fmt: skip
    if sandbox:
        argv += ["-sandbox", SANDBOX_OPTIONS]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(theirs.fileno(),),
        )
    except OSError as exc:
        ours.close()
        raise EngineError(
            f"could not run {binary}: {exc.strerror or exc}; check the QEMU installation"
        ) from exc
    finally:
        theirs.close()
    session = QmpSession("qemu-introspection", lambda _name, _data: None, timeout_s=timeout_s)
    try:
        try:
            await session.connect(ours, timeout_s)
        except EngineError:
            stderr = await _stderr_of(process)
            if sandbox and ("sandbox" in stderr or "seccomp" in stderr):
                raise _SandboxUnsupported() from None
            raise EngineError(
                f"{binary} did not start: {stderr.strip() or 'no message'}; check the QEMU installation"
            ) from None
        version = await session.execute("query-version")
        machines = await session.execute("query-machines")
        cpus = await session.execute("query-cpu-definitions")
        with contextlib.suppress(EngineError):  # it exits while answering
            await session.execute("quit")
    finally:
        await session.close()
        ours.close()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), timeout_s)
    if not (isinstance(version, dict) and isinstance(machines, list) and isinstance(cpus, list)):
        raise EngineError(f"{binary} answered query-version/query-machines in an unexpected form")
    return version, machines, cpus


async def _stderr_of(process: asyncio.subprocess.Process) -> str:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), 5.0)
    if process.stderr is None:
        return ""
    with contextlib.suppress(TimeoutError):
        return (await asyncio.wait_for(process.stderr.read(), 1.0)).decode(errors="replace")
    return ""


def _version_string(version: dict[str, Any]) -> str:
    qemu = version.get("qemu", {})
    return f"{qemu.get('major', 0)}.{qemu.get('minor', 0)}.{qemu.get('micro', 0)}"
