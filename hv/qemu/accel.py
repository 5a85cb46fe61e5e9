"""Choosing the accelerator: KVM where it really runs guests, TCG otherwise. Detected, never assumed.

``/dev/kvm`` existing proves little: a nested or paravirtual KVM (kvm-pvm, for one) may open fine,
run a trivial guest, and still hang a stock kernel, because it emulates guest code instruction by
instruction. So in ``auto`` mode the driver boots a probe guest under ``-accel kvm`` and requires
it to print its marker within a short deadline (1.5 s by default). The probe guest (its source is
``kvm_probe.S`` beside this file) switches to 64-bit long mode, touches 24 MiB of memory and runs a
20-million-iteration loop before it prints: a few milliseconds at hardware speed, many seconds for
an emulating KVM. The verdict is cached in a file keyed by the host kernel release, the QEMU
version and the probe itself, so the probe runs once per host and upgrade.

``kvm`` and ``tcg`` modes skip the probe: ``kvm`` is an operator's override (it still needs
``/dev/kvm``), ``tcg`` never touches KVM.

Imports: :mod:`hv.driver` (errors), :mod:`hv.storage` and :mod:`hv.qemu.host` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from hv.driver import EngineError
from hv.qemu.host import SANDBOX_OPTIONS
from hv.storage import write_atomic

__all__ = [
    "KVM_PROBE_GUEST",
    "KVM_PROBE_MARKER",
    "AccelChoice",
    "AccelMode",
    "choose_accel",
    "probe_kvm",
]

log = logging.getLogger(__name__)

AccelMode = Literal["auto", "kvm", "tcg"]

#: ``kvm_probe.S`` assembled (see the build line there); tests/hv/qemu rebuilds it and compares.
KVM_PROBE_GUEST = bytes.fromhex(
    "02b0ad1b00000100fe4f51e40000100000001000000000000000000020001000fabf0010100031c0b9000c0000"
    "f3abc7050010100003201000c7050020100003301000bf00301000b883000000b9100000008907050000200083"
    "c708e2f4b8001010000f22d80f20e083c8200f22e0b9800000c00f320d000100000f300f20c00d010000800f22"
    "c00f0115f0001000ea960010000800bf00004000893f81c70010000081ff0000c00172f0b9002d3101ffc975fc"
    "488d350f00000066baf803ac84c07403eeebf8f4ebfd46562d4b564d2d50524f42452d4f4b0a008d7426009000"
    "0000000000000000000000009a20000f00e0001000"
)
KVM_PROBE_MARKER = b"FV-KVM-PROBE-OK"
_PROBE_ID = hashlib.sha256(KVM_PROBE_GUEST).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The accelerator the driver uses, and why, for capabilities and logs."""

    accel: Literal["kvm", "tcg"]
    reason: str
    probed: bool = False


class _ProbeRecord(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    kvm_works: bool
    detail: str
    probe_ms: int
    at: float


def cache_key(kernel_release: str, qemu_version: str) -> str:
    return f"kernel={kernel_release} qemu={qemu_version} probe={_PROBE_ID}"


async def choose_accel(
    mode: AccelMode,
    *,
    binary: Path,
    qemu_version: str,
    machine_types: list[str],
    sandbox: bool,
    work_dir: Path,
    cache_file: Path | None,
    kvm_device: Path = Path("/dev/kvm"),
    timeout_s: float = 1.5,
) -> AccelChoice:
    """Decide between KVM and TCG for ``mode``.

    Raises:
        EngineError: ``mode`` is ``kvm`` but ``/dev/kvm`` is missing or not accessible.
        ValueError: ``mode`` is not auto, kvm or tcg.
    """
    if mode == "tcg":
        return AccelChoice("tcg", "TCG chosen by configuration (accel=tcg)")
    if mode not in ("auto", "kvm"):
        raise ValueError(f"accel must be 'auto', 'kvm' or 'tcg', got {mode!r}")
    problem = _kvm_device_problem(kvm_device)
    if mode == "kvm":
        if problem:
            raise EngineError(
                f"accel=kvm was asked for but {problem}; load the kvm module and give the agent access "
                "to /dev/kvm, or use accel=auto to fall back to TCG"
            )
        return AccelChoice("kvm", "KVM chosen by configuration (accel=kvm); not probed")
    if problem:
        return AccelChoice("tcg", f"TCG: {problem}")
    key = cache_key(os.uname().release, qemu_version)
    cached = _read_record(cache_file, key)
    if cached is not None:
        return _verdict(cached, cached=True)
    started = time.monotonic()
    works, detail = await probe_kvm(
        binary, machine_types=machine_types, sandbox=sandbox, work_dir=work_dir, timeout_s=timeout_s
    )
    record = _ProbeRecord(
        key=key,
        kvm_works=works,
        detail=detail,
        probe_ms=round((time.monotonic() - started) * 1000),
        at=time.time(),
    )
    log.info("kvm probe: %s (%d ms)", detail, record.probe_ms)
    if cache_file is not None:
        try:
            write_atomic(cache_file, msgspec.json.encode(record))
        except OSError as exc:
            log.warning("could not cache the kvm probe result in %s: %s", cache_file, exc)
    return _verdict(record, cached=False)


def _read_record(cache_file: Path | None, key: str) -> _ProbeRecord | None:
    if cache_file is None:
        return None
    with contextlib.suppress(OSError, msgspec.DecodeError):
        record = msgspec.json.decode(cache_file.read_bytes(), type=_ProbeRecord)
        if record.key == key:
            return record
    return None


def _write_probe_guest(work_dir: Path) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    guest = work_dir / "kvm-probe.bin"
    write_atomic(guest, KVM_PROBE_GUEST)
    return guest


def _verdict(record: _ProbeRecord, *, cached: bool) -> AccelChoice:
    when = "cached probe" if cached else "probe"
    if record.kvm_works:
        return AccelChoice("kvm", f"KVM: {record.detail} ({when})", probed=True)
    return AccelChoice("tcg", f"TCG: KVM failed the {when}: {record.detail}", probed=True)


def _kvm_device_problem(device: Path) -> str:
    if not device.exists():
        return f"{device} does not exist (no KVM on this host)"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{device} is not readable and writable by this user (add it to the 'kvm' group)"
    return ""


async def probe_kvm(
    binary: Path, *, machine_types: list[str], sandbox: bool, work_dir: Path, timeout_s: float = 1.5
) -> tuple[bool, str]:
    """Boot the probe guest under KVM; True when it prints its marker within ``timeout_s``.

    Never raises for a KVM that does not work: that is the answer "False", with the reason.
    """
    guest = _write_probe_guest(work_dir)
    machine = "microvm" if "microvm" in machine_types else "pc"  # microvm skips the BIOS: faster
    argv = [
        str(binary), "-nodefaults", "-no-user-config", "-display", "none", "-machine", machine,
        "-accel", "kvm", "-cpu", "max", "-m", "32", "-kernel", str(guest), "-serial", "stdio",
    ]  # fmt: skip
    if sandbox:
        argv += ["-sandbox", SANDBOX_OPTIONS]
    started = time.monotonic()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return False, f"could not run {binary}: {exc.strerror or exc}"
    assert process.stdout is not None and process.stderr is not None
    seen = b""
    try:
        async with asyncio.timeout(timeout_s):
            while KVM_PROBE_MARKER not in seen:
                chunk = await process.stdout.read(4096)
                if not chunk:
                    break
                seen += chunk
    except TimeoutError:
        pass
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()
    elapsed_ms = round((time.monotonic() - started) * 1000)
    if KVM_PROBE_MARKER in seen:
        return True, f"the probe guest ran under KVM and answered in {elapsed_ms} ms"
    stderr = (await process.stderr.read()).decode(errors="replace").strip()
    if process.returncode not in (None, -9) and stderr:
        return False, f"qemu -accel kvm failed: {stderr.splitlines()[-1]}"
    return False, (
        f"the probe guest did not answer within {timeout_s:g}s under KVM (a KVM that emulates "
        "guest code, such as a nested or paravirtual one, runs guests far too slowly)"
    )
