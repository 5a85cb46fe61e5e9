"""QEMU processes that outlive the agent: spawning them detached, watching them, reading their load.

A VM's QEMU is started with ``posix_spawn`` in a session of its own (``setsid``), with stdin on
``/dev/null``, stdout and stderr appended to the VM's log, and exactly one extra descriptor: the
QMP listening socket, as fd :data:`QMP_FD`. Every other descriptor of the agent is close-on-exec
(Python's default), so nothing else leaks into QEMU. Because it has its own session, a signal to
the agent's process group (Ctrl-C, systemd stopping the agent) does not reach QEMU.

``subprocess.Popen`` is deliberately not used: a Popen object that is dropped while its process
still runs warns and keeps a zombie bookkeeping entry, and the whole point here is to leave QEMU
running when the driver goes away. Instead a :class:`ProcessWatch` (a pidfd in the event loop)
tells when the process ends, for our own children and for processes a previous agent started
alike; our children are reaped with ``waitpid`` then.

Imports: the standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "QMP_FD",
    "ProcStat",
    "ProcessWatch",
    "cmdline_of",
    "describe_wait_status",
    "read_proc_stat",
    "spawn_detached",
    "uptime_s",
]

#: The descriptor number QEMU finds its QMP listening socket on.
QMP_FD = 3

#: QEMU gets a small, fixed environment rather than the agent's.
_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def spawn_detached(argv: Sequence[str], *, log_path: Path, qmp_socket_fd: int) -> int:
    """Start ``argv`` in a new session, detached from the caller, and return its pid.

    Raises:
        OSError: the binary or the log cannot be opened, or the spawn failed.
    """
    # Move both descriptors above the range the child uses, so each dup2 below really copies (a
    # dup2 onto itself would keep close-on-exec set).
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        high_log = _dup_high(log_fd)
        high_qmp = _dup_high(qmp_socket_fd)
    finally:
        os.close(log_fd)
    try:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, high_log, 1),
            (os.POSIX_SPAWN_DUP2, high_log, 2),
            (os.POSIX_SPAWN_DUP2, high_qmp, QMP_FD),
        ]
        return os.posix_spawn(
            argv[0],
            list(argv),
            _ENV,
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across exec.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    finally:
        os.close(high_log)
        os.close(high_qmp)


def _dup_high(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The parts of ``/proc/PID/stat`` the driver uses."""

    state: str
    #: User plus system CPU time, in clock ticks.
    cpu_ticks: int
    #: When the process started, in clock ticks after boot: with the pid, it names one process.
    start_ticks: int

    @property
    def cpu_s(self) -> float:
        """CPU time used, in seconds."""
        return self.cpu_ticks / CLOCK_TICKS

    @property
    def start_s(self) -> float:
        """Start time, in seconds after boot."""
        return self.start_ticks / CLOCK_TICKS


def read_proc_stat(pid: int) -> ProcStat | None:
    """The process's state, CPU time and start time, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime, stime are fields 14, 15; starttime is field 22.
    return ProcStat(
        state=fields[0].decode(),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        start_ticks=int(fields[19]),
    )


def uptime_s() -> float:
    """Seconds since the host booted (the clock ``ProcStat.start_s`` counts in)."""
    return float(Path("/proc/uptime").read_text().split()[0])


def cmdline_of(pid: int) -> list[str]:
    """The process's argv, or [] when it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def describe_wait_status(status: int | None) -> str:
    """A wait status in words: ``exit status 1``, ``killed by SIGKILL``, or unknown."""
    if status is None:
        return "exit status unknown (it was started by an earlier agent)"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status:#x}"


class ProcessWatch:
    """Calls ``on_exit(wait_status)`` once, from the event loop, when process ``pid`` ends.

    ``wait_status`` is None when the process is not our child (a previous agent started it), so
    its exit status cannot be known. Signals go through the pidfd, so they can never hit another
    process that reused the pid.

    Raises (constructor):
        ProcessLookupError: there is no such process.
    """

    def __init__(self, pid: int, on_exit: Callable[[int | None], None]) -> None:
        self.pid = pid
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = os.pidfd_open(pid)
        self.exited = asyncio.Event()
        self.wait_status: int | None = None
        self._loop.add_reader(self._pidfd, self._readable)

    def _readable(self) -> None:
        self._close()
        status: int | None = None
        with contextlib.suppress(ChildProcessError):
            reaped, raw = os.waitpid(self.pid, os.WNOHANG)
            if reaped == self.pid:
                status = raw
        self.wait_status = status
        self.exited.set()
        self._on_exit(status)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process if it still runs (through the pidfd: no pid reuse race)."""
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    async def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the process to end; True when it has."""
        if self.exited.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), timeout_s)
        return self.exited.is_set()

    def detach(self) -> None:
        """Stop watching without touching the process (the driver is closing; the VM runs on)."""
        self._close()

    def _close(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
