"""Fencing: make sure a failed host cannot still be running its VMs before they restart elsewhere.

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
