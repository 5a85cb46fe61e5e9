"""Real QEMU for tests: the project's test guests, VM specs that boot them, and cleanup by PID.

The guests come from ``scripts/build-guests`` (run on demand here; it is idempotent and fast when
nothing changed). They live in one directory, :func:`guest_dir`: ``$FV_GUEST_DIR``, else .cache/guests
in the repo, the same default scripts/build-guests and scripts/_env.sh use; every test and bench finds
them through it. :func:`qemu_skip_reason` says why QEMU tests cannot run on this machine, and
:func:`require_guests` skips a test for it (fails it under CI, see :mod:`tests.support.needs`).

Every QEMU a test starts is found again through the driver's state directory (each VM's pid file
and ``state.json``) and killed by its PID with :func:`kill_qemus_under`: never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protocols.vmspec import BootSpec, DiskSpec, NicSpec, VmSpec
from tests.support.needs import missing, need

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-guests"
#: Where the guests are when ``FV_GUEST_DIR`` is not set (scripts/build-guests' own default).
DEFAULT_GUEST_DIR = ROOT / ".cache" / "guests"
NO_LINUX_GUEST = (
    "no Linux guest: scripts/build-guests found no /boot/vmlinuz-* with modules "
    "(apt-get install -y linux-image-amd64 busybox-static cpio)"
)


def guest_dir() -> Path:
    """The directory of the built test guests: ``$FV_GUEST_DIR``, else .cache/guests in the repo."""
    return Path(os.environ.get("FV_GUEST_DIR") or DEFAULT_GUEST_DIR)


@dataclass(frozen=True, slots=True)
class Guests:
    """The built test guests. ``linux_*`` are None when the machine has no kernel to use."""

    dir: Path
    tiny: Path
    linux_kernel: Path | None
    linux_initrd: Path | None


def qemu_skip_reason() -> str | None:
    """Why QEMU tests cannot run here, or None when they can."""
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y {package}, or run ./scripts/test as root)"
    return None


@functools.cache
def build_guests() -> Guests | str:
    """Build (or find) the test guests; a string says why they could not be built."""
    out_dir = guest_dir()
    try:
        done = subprocess.run(
            [str(BUILD_SCRIPT), str(out_dir)], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scripts/build-guests could not run: {exc}"
    if done.returncode != 0:
        return f"scripts/build-guests failed: {done.stderr.strip()[-500:]}"
    paths = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    kernel, initrd = paths.get("linux_kernel"), paths.get("linux_initrd")
    return Guests(
        dir=out_dir.resolve(),
        tiny=Path(paths["tiny"]),
        linux_kernel=Path(kernel) if kernel else None,
        linux_initrd=Path(initrd) if initrd else None,
    )


def require_guests(*, linux: bool = False) -> Guests:
    """The built guests (the Linux one too when ``linux``), for a test that boots them.

    Raises:
        pytest.skip.Exception: QEMU or a guest is missing (pytest.fail's under CI).
    """
    reason = qemu_skip_reason()
    if reason:
        missing(reason)
    built = build_guests()
    if isinstance(built, str):
        missing(built)
    if linux:
        need(built.linux_kernel is not None and built.linux_initrd is not None, NO_LINUX_GUEST)
    return built


@functools.cache
def host_tsc_khz() -> int:
    """The host CPU's clock in kHz, which TCG's guest TSC runs at (2 GHz if /proc does not say)."""
    with contextlib.suppress(OSError):
        match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return int(float(match.group(1)) * 1000)
    return 2_000_000


def tiny_spec(
    name: str,
    guests: Guests,
    *,
    machine: str = "microvm",
    dirty_mib_s: int = 0,
    memory_mib: int = 64,
    kernel: Path | None = None,
    extra_cmdline: str = "",
    **fields: object,
) -> VmSpec:
    """A VM booting the tiny guest (READY, then count=N every second), with only the devices asked for.

    The tiny guest has no drivers, so by default it gets no virtio devices (console, rng, balloon).
    ``extra_cmdline`` adds to its command line, e.g. ``reset_after_s=1``.
    """
    options: dict[str, object] = {"console": False, "rng": False, "balloon": False, **fields}
    return VmSpec(
        name=name,
        memory_mib=memory_mib,
        machine=machine,  # type: ignore[arg-type]
        boot=BootSpec(
            kernel=str(kernel or guests.tiny), cmdline=f"dirty_mib_s={dirty_mib_s} {extra_cmdline}".strip()
        ),
        **options,  # type: ignore[arg-type]
    )


def linux_cmdline(machine: str) -> str:
    """The Linux guest's kernel command line for ``machine``.

    Under TCG, microvm offers the kernel nothing to calibrate its TSC against (no PIT gate, HPET or
    PM timer) and the boot may hang there, so the frequency is given (``tsc_early_khz``).
    """
    cmdline = "console=ttyS0 quiet panic=-1"
    if machine == "microvm":
        cmdline += f" tsc_early_khz={host_tsc_khz()} pci=off"
    return cmdline


def linux_spec(
    name: str,
    guests: Guests,
    *,
    machine: str = "microvm",
    memory_mib: int = 256,
    disks: list[DiskSpec] | None = None,
    nics: list[NicSpec] | None = None,
    extra_cmdline: str = "",
    **fields: object,
) -> VmSpec:
    """A VM booting the Linux guest (READY, the virtio devices it sees, a counter).

    ``extra_cmdline`` adds to the kernel command line, e.g. ``poweroff_after_s=1``.
    """
    assert guests.linux_kernel is not None and guests.linux_initrd is not None
    return VmSpec(
        name=name,
        memory_mib=memory_mib,
        machine=machine,  # type: ignore[arg-type]
        boot=BootSpec(
            kernel=str(guests.linux_kernel),
            initrd=str(guests.linux_initrd),
            cmdline=f"{linux_cmdline(machine)} {extra_cmdline}".strip(),
        ),
        disks=disks or [],
        nics=nics if nics is not None else [NicSpec()],
        **fields,  # type: ignore[arg-type]
    )


async def wait_for_text(path: Path, text: str, timeout: float, *, after: int = 0) -> str:
    """Poll ``path`` until it holds ``text`` (from byte ``after`` on); return the file's text.

    Raises:
        AssertionError: it did not appear within ``timeout`` seconds (the end of the file is shown).
    """
    deadline = time.monotonic() + timeout
    needle = text.encode()
    while True:
        data = read_bytes(path)
        if needle in data[after:]:
            return data.decode(errors="replace")
        if time.monotonic() > deadline:
            tail = data[-1500:].decode(errors="replace")
            raise AssertionError(
                f"{text!r} did not appear in {path} within {timeout}s; it ends with:\n{tail}"
            )
        await asyncio.sleep(0.02)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, or none when it does not exist yet."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


async def until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``check`` every 20 ms until it is truthy.

    Raises:
        AssertionError: it was not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def counter_values(text: str) -> list[int]:
    """The ``count=N`` values a guest printed, in order."""
    return [int(n) for n in re.findall(r"^count=(\d+)", text, re.MULTILINE)]


def qemu_pids_under(state_dir: Path) -> set[int]:
    """PIDs of the QEMUs a qemu driver started for ``state_dir`` (pid files and state.json)."""
    pids: set[int] = set()
    for vm_dir in (state_dir / "vms").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            pids.add(int((vm_dir / "qemu.pid").read_text().strip()))
        with contextlib.suppress(OSError, ValueError, TypeError):
            pid = json.loads((vm_dir / "state.json").read_text()).get("pid")
            if pid:
                pids.add(int(pid))
    return pids


def is_qemu_of(pid: int, state_dir: Path) -> bool:
    """Whether ``pid`` is still a QEMU started for ``state_dir`` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "qemu" in cmdline and str(state_dir) in cmdline


def kill_qemus_under(state_dir: Path) -> list[int]:
    """SIGKILL every QEMU started for ``state_dir`` by PID, reap our own children; return the PIDs."""
    killed = []
    for pid in sorted(qemu_pids_under(state_dir)):
        if not is_qemu_of(pid, state_dir):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    for pid in killed:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            time.sleep(0.01)
    return killed


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
