"""One QEMU process of one VM: launching it, its QMP session, its phases, and making it exit.

A :class:`QemuInstance` is what the engine knows about a running QEMU: its pid (and start time,
which with the pid names one process), the pidfd watch, the QMP session, and the phases of
:mod:`hv.qemu.phase`. It does not know the VM record: the exit and event callbacks it is built
with are bound to the VM by :mod:`hv.qemu.vm_events`.

The module-level helpers prepare a VM's runtime directory (logs, the QMP socket), spawn QEMU
detached, recognise a QEMU left by an earlier driver, and quote QEMU's log in error messages.

Imports: :mod:`hv.driver` (errors), :mod:`hv.qemu.command_line` (file names),
:mod:`hv.qemu.phase`, :mod:`hv.qemu.process` and :mod:`hv.qemu.qmp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hv.driver import EngineError
from hv.qemu import command_line
from hv.qemu.phase import CallPhase, DirtyProbe, ExitClues, MigrationPhase
from hv.qemu.process import ProcessWatch, cmdline_of, spawn_detached
from hv.qemu.qmp import QmpSession

__all__ = [
    "ExitHandler",
    "QemuEventHandler",
    "QemuInstance",
    "is_qemu_of",
    "prepare_runtime_files",
    "qemu_says",
    "read_pid",
    "reap",
    "spawn_qemu",
]

#: How the driver marks each start in qemu.log (error messages quote what QEMU printed after it).
START_MARK = "fleetvisor: starting"

#: Called with the instance and its wait status (None when it is not our child) when QEMU ends.
ExitHandler = Callable[["QemuInstance", int | None], None]
#: Called with the instance, the event name and its data, inside the QMP reader.
QemuEventHandler = Callable[["QemuInstance", str, Mapping[str, Any]], None]


class QemuInstance:
    """One running QEMU process of a VM and what the engine knows about it."""

    def __init__(
        self,
        pid: int,
        *,
        vm: str,
        vm_dir: Path,
        qmp_timeout_s: float,
        on_exit: ExitHandler,
        on_event: QemuEventHandler,
    ) -> None:
        self.pid = pid
        self.vm = vm
        self.dir = vm_dir
        self.qmp_timeout_s = qmp_timeout_s
        self._on_exit = on_exit
        self._on_event = on_event
        self.start_ticks: int | None = None
        self.watch: ProcessWatch | None = None
        self.qmp: QmpSession | None = None
        self.calls = CallPhase.IDLE
        self.migration = MigrationPhase.NONE
        self.dirty = DirtyProbe.IDLE
        self.clues = ExitClues()
        self.cpu_sample: tuple[float, float] | None = None
        self.dirty_mib_s = 0.0
        #: Source with storage copy: one switchover (mirrors completed, migrate-continue) at a time.
        self.switchover_lock = asyncio.Lock()
        #: Source: set by each QMP ``MIGRATION`` event; migrate_wait waits on it.
        self.migration_news = asyncio.Event()
        #: Set once the engine has judged the process's exit (and read what QMP said before it).
        self.exit_judged = asyncio.Event()

    @property
    def exited(self) -> bool:
        """Whether the process has ended (or is not watched)."""
        return self.watch is None or self.watch.exited.is_set()

    def watch_process(self) -> None:
        """Start watching the process (a pidfd).

        Raises:
            ProcessLookupError: it has ended already.
        """
        self.watch = ProcessWatch(self.pid, lambda wait_status: self._on_exit(self, wait_status))

    async def connect(self, timeout_s: float) -> QmpSession:
        """Connect to QEMU's QMP socket in the VM's directory and handshake within ``timeout_s``.

        Raises:
            EngineError: the socket cannot be reached or QEMU does not answer.
        """
        session = QmpSession(
            self.vm, lambda name, data: self._on_event(self, name, data), timeout_s=self.qmp_timeout_s
        )
        try:
            sock = _connect_unix(self.dir, command_line.QMP_SOCKET)
        except OSError as exc:
            raise EngineError(
                f"vm {self.vm!r}: cannot reach qemu's monitor at {self.dir / command_line.QMP_SOCKET}: "
                f"{exc.strerror or exc}"
            ) from exc
        try:
            await session.connect(sock, timeout_s)  # on success the session owns the socket
        except BaseException:
            sock.close()
            raise
        self.qmp = session
        return session

    async def session(self) -> QmpSession:
        """The QMP session, reconnected if it was lost while QEMU still runs.

        Raises:
            EngineError: QEMU has exited or its monitor does not answer.
        """
        if self.qmp is not None and self.qmp.connected:
            return self.qmp
        if self.exited:
            raise EngineError(f"vm {self.vm!r}: qemu (pid {self.pid}) has exited")
        return await self.connect(self.qmp_timeout_s)

    async def own_cont(self, qmp: QmpSession) -> None:
        """QMP ``cont``, with its ``RESUME`` marked as the driver's own."""
        await self._own(qmp, "cont", CallPhase.RESUMING, self.calls.resume_expected)

    async def own_stop(self, qmp: QmpSession) -> None:
        """QMP ``stop``, with its ``STOP`` marked as the driver's own."""
        await self._own(qmp, "stop", CallPhase.PAUSING, self.calls.stop_expected)

    async def _own(self, qmp: QmpSession, command: str, phase: CallPhase, covered: bool) -> None:
        previous = self.calls
        if not covered:
            self.calls = phase
        try:
            await qmp.execute(command)
        finally:
            if self.calls is phase and not covered:
                self.calls = previous

    async def terminate(self) -> None:
        """Make QEMU exit: QMP ``quit``, then SIGTERM, then SIGKILL, each with a deadline.

        Raises:
            EngineError: it still runs after SIGKILL.
        """
        self.calls = CallPhase.STOPPING
        watch = self.watch
        if watch is None or watch.exited.is_set():
            return
        if self.qmp is not None and self.qmp.connected:
            with contextlib.suppress(EngineError):
                await self.qmp.execute("quit", timeout_s=2.0)
            if await watch.wait(3.0):
                return
        for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            watch.send_signal(sig)
            if await watch.wait(wait_s):
                return
        raise EngineError(
            f"vm {self.vm!r}: qemu (pid {self.pid}) is still there after SIGKILL; it is probably stuck "
            "in the kernel (state D); check the host's storage"
        )

    async def kill(self, wait_s: float) -> None:
        """SIGKILL, then wait up to ``wait_s`` for the exit (no error if it lingers)."""
        if self.watch is not None:
            self.watch.send_signal(signal.SIGKILL)
            await self.watch.wait(wait_s)

    async def wait_briefly(self) -> None:
        """Give an exit that is under way a moment (2 s) to be seen."""
        if self.watch is not None:
            await self.watch.wait(2.0)


def spawn_qemu(vm: str, vm_dir: Path, argv: Sequence[str]) -> int:
    """Bind the QMP socket in ``vm_dir`` and spawn QEMU detached with it; returns its pid.

    Raises:
        EngineError: the socket cannot be created or QEMU cannot be run.
    """
    try:
        listener = _bind_unix(vm_dir, command_line.QMP_SOCKET)
    except OSError as exc:
        raise EngineError(
            f"vm {vm!r}: cannot create its QMP socket in {vm_dir}: {exc.strerror or exc}"
        ) from exc
    try:
        return spawn_detached(argv, log_path=vm_dir / command_line.QEMU_LOG, qmp_socket_fd=listener.fileno())
    except OSError as exc:
        raise EngineError(
            f"vm {vm!r}: cannot run {argv[0]}: {exc.strerror or exc}; "
            "install QEMU (apt-get install -y qemu-system-x86) or fix qemu_binary"
        ) from exc
    finally:
        listener.close()  # QEMU has its own copy now


def prepare_runtime_files(vm: str, vm_dir: Path, argv: Sequence[str]) -> None:
    """Keep the previous boot's serial log as ``serial.log.1``; note the command in qemu.log.

    Raises:
        EngineError: the files cannot be written.
    """
    try:
        for name in (command_line.SERIAL_LOG, command_line.CONSOLE_LOG):
            with contextlib.suppress(FileNotFoundError):
                os.replace(vm_dir / name, vm_dir / f"{name}.1")
        with (vm_dir / command_line.QEMU_LOG).open("a") as qemu_log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            qemu_log.write(f"{stamp} {START_MARK} {shlex.join(argv)}\n")
    except OSError as exc:
        raise EngineError(
            f"vm {vm!r}: cannot prepare its log files in {vm_dir}: {exc.strerror or exc}; "
            "check free space and permissions of the state directory"
        ) from exc


def qemu_says(vm_dir: Path, lines: int = 4) -> str:
    """QEMU's own messages since the last start, for an error a person reads."""
    path = vm_dir / command_line.QEMU_LOG
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    since_start = text.rsplit(START_MARK, 1)[-1].splitlines()[1:] if START_MARK in text else []
    said = [_without_timestamp(line) for line in since_start if line.strip()][-lines:]
    if not said:
        return f"qemu printed nothing; check the host, then the full log {path}"
    return f"qemu said: {' / '.join(said)}; fix the VM's spec or the host accordingly (full log: {path})"


def _without_timestamp(line: str) -> str:
    """A qemu.log line without the ``-msg timestamp=on`` prefix and the program name."""
    stamp, sep, rest = line.partition(" ")
    if sep and stamp[:4].isdigit() and "T" in stamp:
        line = rest
    program, sep, message = line.partition(": ")
    return message if sep and os.path.basename(program).startswith("qemu") else line


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None when it is missing or garbled."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def is_qemu_of(pid: int, vm_dir: Path) -> bool:
    """Whether process ``pid`` is a QEMU whose pid file is in ``vm_dir`` (not a process that reused
    the pid).
    """
    argv = cmdline_of(pid)
    if not argv or "qemu" not in Path(argv[0]).name or "-pidfile" not in argv[:-1]:
        return False
    # The same file, however the state directory was spelt (relative, through a symlink).
    try:
        return os.path.samefile(argv[argv.index("-pidfile") + 1], vm_dir / command_line.PID_FILE)
    except OSError:
        return False


def reap(pid: int) -> None:
    """Collect the exit status of our own child ``pid`` if it is a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _dir_path(vm_dir: Path, name: str) -> tuple[int, str]:
    """A short path to ``vm_dir/name`` through /proc/self/fd: unix socket paths are limited to 108
    bytes, state directories are not. The caller closes the returned descriptor.
    """
    fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return fd, f"/proc/self/fd/{fd}/{name}"


def _bind_unix(vm_dir: Path, name: str) -> socket.socket:
    fd, path = _dir_path(vm_dir, name)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(8)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)


def _connect_unix(vm_dir: Path, name: str) -> socket.socket:
    fd, path = _dir_path(vm_dir, name)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)  # a full backlog must not block the event loop
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)
