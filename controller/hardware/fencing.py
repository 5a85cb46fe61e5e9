"""Fencing: make sure a failed host cannot still be running its VMs before they restart elsewhere.

``BmcFencer`` powers the host off through its BMC (IPMI over LAN) and accepts only a BMC that then
reads "off": the hardware answer, for real fleets.

``ProcessFencer`` is for fleets whose hosts are processes on one machine: the demo, the tests and
the benchmarks, where there is no BMC to cut power. Each agent keeps ``agent.pid`` in its state
directory, and the QEMU engine keeps a pid file per VM there too. To fence host H, the fencer
SIGKILLs every process listed under ``<fence_dir>/H/`` (by PID, after checking that the PID still
belongs to a fleetvisor or QEMU process, in case it was reused). It waits until they are gone. Then
it leaves a ``fenced`` marker, so a sim agent that starts again knows its in-process guests died with
it. This plays the part of a BMC power-off, and the power-management work adds the real one.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import time
from collections.abc import Mapping

import msgspec

from controller.hardware.driver import PowerError
from controller.hardware.factory import bmc_driver
from controller.hardware.ipmi import BmcConfig

FENCED_MARKER = "fenced"
_OURS = (b"fleetvisor", b"qemu-system")


def _cmdline(pid: int) -> bytes | None:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    stat = pathlib.Path(f"/proc/{pid}/stat")
    try:
        # A zombie has exited; it only waits for its parent to reap it.
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class BmcFencer:
    """Fence by cutting the host's power through its BMC, and confirm the BMC reads off."""

    def __init__(self, bmcs: Mapping[str, BmcConfig]) -> None:
        self.bmcs = bmcs

    async def fence(self, host_id: str) -> tuple[bool, str]:
        config = self.bmcs.get(host_id)
        if config is None:
            return False, f"no BMC is configured for host {host_id} (--bmc-config)"
        driver = bmc_driver(config)
        try:
            await driver.power_off()
            status = await driver.status()
        except PowerError as exc:
            return False, str(exc)
        if status != "off":
            return False, f"the BMC at {config.address}:{config.port} still reads power {status}"
        return True, f"the BMC at {config.address}:{config.port} confirms power off"


def load_bmc_config(path: pathlib.Path) -> dict[str, BmcConfig]:
    """Per-host BMC settings from a JSON or YAML file::

        {"h1": {"address": "10.0.0.11", "port": 623, "username": "admin", "password_file": "/etc/fv/h1.bmc"}}

    Raises:
        ValueError: the file is unreadable, malformed, or a password file is missing.
    """
    try:
        raw = path.read_bytes()
        data = msgspec.yaml.decode(raw) if path.suffix in (".yaml", ".yml") else msgspec.json.decode(raw)
        entries = msgspec.convert(data, dict[str, _BmcEntry])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"BMC config {str(path)!r}: {exc}; see `fleetvisor controller --help`") from None
    configs = {}
    for host_id, entry in entries.items():
        try:
            password = pathlib.Path(entry.password_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            raise ValueError(
                f"BMC config {str(path)!r}: cannot read the password file of host {host_id!r}"
            ) from None
        configs[host_id] = BmcConfig(
            host_id=host_id,
            address=entry.address,
            port=entry.port,
            username=entry.username,
            password=password,
        )
    return configs


class _BmcEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    address: str
    port: int = 623
    username: str
    password_file: str


class ProcessFencer:
    def __init__(self, fence_dir: pathlib.Path, timeout_s: float = 5.0) -> None:
        self.fence_dir = fence_dir
        self.timeout_s = timeout_s

    async def fence(self, host_id: str) -> tuple[bool, str]:
        """Kill the host's processes. Returns (confirmed, what was done or why it failed)."""
        host_dir = self.fence_dir / host_id
        if not host_dir.is_dir():
            return False, f"no state directory {host_dir} to find the host's processes in"
        victims: list[tuple[int, str]] = []
        for pid_file in sorted(host_dir.rglob("*.pid")):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            cmdline = _cmdline(pid)
            if cmdline is not None and any(tag in cmdline for tag in _OURS) and _alive(pid):
                victims.append((pid, pid_file.name))
        for pid, _ in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                return False, f"not allowed to kill pid {pid} of host {host_id}"
        deadline = time.monotonic() + self.timeout_s
        while any(_alive(pid) for pid, _ in victims):
            if time.monotonic() > deadline:
                left = [pid for pid, _ in victims if _alive(pid)]
                return False, f"processes {left} of host {host_id} survived SIGKILL for {self.timeout_s:g}s"
            await asyncio.sleep(0.02)
        (host_dir / FENCED_MARKER).write_text(f"{time.time()}\n")
        what = ", ".join(f"{name} ({pid})" for pid, name in victims) or "nothing was still running"
        return True, f"host processes killed and gone: {what}"
