"""A real BMC for tests: OpenIPMI's ``ipmi_sim`` on a free loopback port, and ``ipmitool`` to check it.

:class:`IpmiSim` writes a ``lan.conf`` (one LAN channel on ``127.0.0.1:port``, RMCP+ with user
``admin``/``password`` at ADMINISTRATOR privilege) and an emulator command file that makes MC 0x20
the BMC, then starts ``ipmi_sim`` on them.

The simulated chassis's power is a process: ``startcmd`` (the host's agent) is started on an IPMI
power-on and killed on a power-off. ipmi_sim only does that when channel 15 is a ``serial ... codec
VM`` interface, so one is configured on a free TCP port; nothing connects to it, so a power-off
sends SIGTERM at once (``poweroff_wait``), then SIGKILL after ``kill_wait`` seconds. ipmi_sim runs
``startcmd`` through ``/bin/sh -c "exec ..."``.

Found by reading ipmi_sim(1), ipmi_lan(5), ipmi_sim_cmd(5) and trying (Debian 12: openipmi 2.0.33,
whose ipmi_sim says 1.0.13; ipmitool 1.8.19; pyghmi 1.6.19):
- without ``mc_setbmc 0x20`` in the command file ipmi_sim exits at once (status 1, the reason goes to
  syslog only);
- without the channel-15 VM serial interface, Chassis Control answers "invalid data field";
- ipmitool 1.8.19 asks for the channel's cipher suites, which ipmi_sim does not implement, and
  waits 10 s before it falls back: :meth:`IpmiSim.ipmitool` passes ``-C 3`` to skip that;
- ipmi_sim grants a session the privilege it asks for whatever the user's limit in lan.conf, so
  privilege checks cannot be tested against it;
- ipmi_sim does not kill ``startcmd`` when it exits itself, so :meth:`IpmiSim.stop` kills what is
  left by PID (and :data:`AGENT_STUB` also asks Linux to kill it with its parent);
- on loopback an answer can arrive before pyghmi's client has started waiting for it; pyghmi then
  misses it and resends after its 0.5-1 s retry timer, so an exchange here sometimes takes a second.
  On a real network the answer is slower than that window, and nothing is lost either way.

Every process is stopped by PID, never by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from tests.support.needs import missing

#: RMCP/ASF Presence Ping; any BMC answers it without a session, so it tells when ipmi_sim is up.
ASF_PING = bytes.fromhex("0600ff06000011be80000000")

#: Stands in for a host's agent: writes its PID to argv[1], then sleeps until killed. It asks Linux
#: to SIGKILL it when its parent (ipmi_sim's shell, exec'd into it) dies, so a crashed simulator
#: leaves nothing behind.
AGENT_STUB = """\
import ctypes, os, signal, sys, time
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\\n")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(3600)
"""


class IpmiSimError(Exception):
    """ipmi_sim did not start or answer; the message includes the end of its log."""


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL ipmi_sim if the test process dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def ipmi_skip_reason() -> str | None:
    """Why the IPMI tests cannot run here, or None when they can."""
    for tool, package in (("ipmi_sim", "openipmi"), ("ipmitool", "ipmitool")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y {package})"
    return None


def require_ipmi() -> None:
    """Go on when ipmi_sim and ipmitool are installed.

    Raises:
        pytest.skip.Exception: one is missing (pytest.fail's under CI, see tests.support.needs).
    """
    reason = ipmi_skip_reason()
    if reason is not None:
        missing(reason)


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port on ``host`` that nothing is bound to right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, which has exited and waits to be reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _kill_and_wait(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``timeout``; by PID only."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not any(pid_alive(pid) for pid in pids):
            return


class IpmiSim:
    """One ipmi_sim on ``127.0.0.1:port`` whose chassis power runs ``startcmd``.

    ``startcmd`` is an argv list; it must not contain double quotes (lan.conf cannot escape them).
    """

    username = "admin"
    password = "password"

    def __init__(
        self,
        workdir: Path,
        startcmd: list[str],
        *,
        port: int | None = None,
        binary: str | None = None,
        kill_wait_s: int = 2,
    ) -> None:
        found = binary or shutil.which("ipmi_sim")
        if found is None:
            raise IpmiSimError("ipmi_sim is not installed; apt-get install -y openipmi")
        command = shlex.join(startcmd)
        if '"' in command:
            raise IpmiSimError(f"startcmd cannot contain double quotes: {command}")
        self.binary = found
        self.workdir = workdir
        self.startcmd = command
        self.port = port if port is not None else free_udp_port()
        self.serial_port = free_tcp_port()
        self.kill_wait_s = kill_wait_s
        self.config_path = workdir / "lan.conf"
        self.emu_path = workdir / "bmc.emu"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "ipmi_sim.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def lan_conf(self) -> str:
        return "\n".join(
            [
                'name "fleetvisor-test"',
                "set_working_mc 0x20",
                "  startlan 1",
                f"    addr 127.0.0.1 {self.port}",
                "    priv_limit admin",
                "    allowed_auths_callback none md2 md5 straight",
                "    allowed_auths_user none md2 md5 straight",
                "    allowed_auths_operator none md2 md5 straight",
                "    allowed_auths_admin none md2 md5 straight",
                "    guid a123456789abcdefa123456789abcdef",
                "  endlan",
                f"  serial 15 127.0.0.1 {self.serial_port} codec VM",
                f'  startcmd "{self.startcmd}"',
                "  startnow false",
                "  poweroff_wait 1",
                f"  kill_wait {self.kill_wait_s}",
                f'  user 2 true "{self.username}" "{self.password}" admin 10 none md2 md5 straight',
                "",
            ]
        )

    @staticmethod
    def emulator_commands() -> str:
        return "\n".join(
            [
                "mc_setbmc 0x20",
                "mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr",
                "mc_enable 0x20",
                "",
            ]
        )

    def start(self, timeout: float = 5.0) -> None:
        """Start ipmi_sim and wait until it answers an RMCP ping.

        Raises:
            IpmiSimError: it exited or did not answer in time (log attached).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(exist_ok=True)
        self.config_path.write_text(self.lan_conf())
        self.emu_path.write_text(self.emulator_commands())
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [
                self.binary,
                "-n",
                "-c",
                str(self.config_path),
                "-f",
                str(self.emu_path),
                "-s",
                str(self.state_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.1)
            while True:
                if self._process.poll() is not None:
                    self.stop()
                    raise IpmiSimError(f"ipmi_sim exited at start\n--- log ---\n{self.log_tail()}")
                with contextlib.suppress(OSError):
                    sock.sendto(ASF_PING, ("127.0.0.1", self.port))
                    if sock.recv(512)[:4] == ASF_PING[:4]:
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise IpmiSimError(f"ipmi_sim did not answer within {timeout:g}s\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop ipmi_sim, then whatever it started that is still running; all by PID."""
        process = self._process
        if process is None:
            return
        started = _children(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        _kill_and_wait([pid for pid in started if pid_alive(pid)])
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def started_pids(self) -> list[int]:
        """PIDs of the running processes ipmi_sim started (the power-on command)."""
        if self._process is None:
            return []
        return [pid for pid in _children(self._process.pid) if pid_alive(pid)]

    def ipmitool(self, *args: str, password: str | None = None, timeout: float = 15.0) -> str:
        """Run ``ipmitool -I lanplus`` against this BMC; returns stdout.

        Raises:
            AssertionError: ipmitool failed (its stderr is in the message).
        """
        tool = shutil.which("ipmitool")
        assert tool is not None, "ipmitool is not installed (apt-get install -y ipmitool)"
        argv = [tool, "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(self.port)]
        argv += ["-U", self.username, "-P", password if password is not None else self.password, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}"
        return done.stdout

    def power_via_ipmitool(self) -> str:
        """``on`` or ``off``, as ``ipmitool chassis power status`` reports it."""
        out = self.ipmitool("chassis", "power", "status").strip()
        assert out.startswith("Chassis Power is "), out
        return out.removeprefix("Chassis Power is ")

    def log_tail(self, max_chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-max_chars:] or "(empty log)"
        return "(no log)"

    def __repr__(self) -> str:
        return f"IpmiSim(port={self.port}, pid={self.pid})"


def stub_agent_command(pid_file: Path) -> list[str]:
    """Argv of :data:`AGENT_STUB`, writing its PID to ``pid_file``."""
    script = pid_file.parent / "agent_stub.py"
    script.write_text(AGENT_STUB)
    return [sys.executable, str(script), str(pid_file)]


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``check`` until it returns truthy.

    Raises:
        AssertionError: it did not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
