"""Real MQTT brokers for tests: a Mosquitto process, and the embedded amqtt broker.

:class:`MosquittoBroker` runs the ``mosquitto`` binary on a loopback port with a config file it
writes into a scratch directory. It is stopped and killed by its PID only, never by name, so tests
can run beside a system Mosquitto service and beside each other. The broker can be restarted on the
same port, with or without persistence, which is what the reconnect and session tests need.

:class:`EmbeddedBroker` wraps amqtt 0.12.1, the broker the controller embeds for small sites. It
speaks MQTT 3.1.1 only.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

#: Where Debian puts the broker; /usr/sbin is not on a normal user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

AMQTT_LOGGERS = ("amqtt", "transitions", "websockets")


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL the broker if the test process dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _broker_owned_dir() -> Path:
    """A persistence directory for a broker started as root, which drops to the 'mosquitto' user.

    That user cannot enter pytest's private tmp_path, so the directory lives in the system's temp dir,
    owned by the broker's user, and is removed when the test process no longer needs it.
    """
    path = Path(tempfile.mkdtemp(prefix="fv-mosquitto-persist-"))
    entry = pwd.getpwnam("mosquitto")
    os.chown(path, entry.pw_uid, entry.pw_gid)
    atexit.register(shutil.rmtree, path, True)
    return path


class BrokerError(Exception):
    """A test broker did not start or stop; the message includes the end of its log."""


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def wait_listening(host: str, port: int, timeout: float, alive: Any = None) -> None:
    """Block until a TCP connect to ``host:port`` succeeds.

    Raises:
        BrokerError: nothing listened within ``timeout`` seconds, or ``alive()`` turned False.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise BrokerError(f"broker on {host}:{port} exited before it listened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise BrokerError(f"nothing listened on {host}:{port} within {timeout:g}s") from None
            time.sleep(0.02)


class MosquittoBroker:
    """One Mosquitto process on ``127.0.0.1:port``, with its config and log under ``workdir``.

    ``persistence=True`` keeps sessions and retained messages in ``workdir/persist`` (as root, in a
    directory of the broker's own user, see :func:`_broker_owned_dir`) across a
    graceful :meth:`stop` and the next :meth:`start` (a :meth:`kill` loses what was not saved yet).
    ``extra_config`` lines are appended to the generated config.
    """

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        persistence: bool = False,
        extra_config: str = "",
        binary: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise BrokerError("mosquitto is not installed; apt-get install -y mosquitto")
        self.binary = found
        self.workdir = workdir
        self.host = host
        self.port = port
        self.persistence = persistence
        self.extra_config = extra_config
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        as_root = os.geteuid() == 0
        self.persistence_dir = _broker_owned_dir() if persistence and as_root else workdir / "persist"
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            # Small messages leave at once, not after the client's delayed ACK (see docs/protocol.md).
            "set_tcp_nodelay true",
            f"persistence {'true' if self.persistence else 'false'}",
            "log_dest stderr",
            "log_type all",
            "connection_messages true",
        ]
        if self.persistence:
            lines.append(f"persistence_location {self.persistence_dir}/")
        if self.extra_config:
            lines.append(self.extra_config.strip())
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until its port accepts connections.

        Raises:
            BrokerError: it is already running, exited, or did not listen in time (log attached).
        """
        if self.running:
            raise BrokerError(f"mosquitto on port {self.port} is already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.persistence:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self._close_log()
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self.starts += 1
        process = self._process
        try:
            wait_listening(self.host, self.port, timeout, alive=lambda: process.poll() is None)
        except BrokerError as exc:
            self.kill()
            raise BrokerError(f"mosquitto did not start: {exc}\n--- log ---\n{self.log_tail()}") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully (SIGTERM: sessions are saved when persistence is on); SIGKILL if it hangs."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._process = None
        self._close_log()

    def kill(self) -> None:
        """Kill at once with SIGKILL (a crash: nothing is saved, clients see the socket close)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(10)
        self._process = None
        self._close_log()

    def restart(self, *, kill: bool = False, down_s: float = 0.0, timeout: float = 10.0) -> None:
        """Stop (or kill) the broker, stay down ``down_s`` seconds, and start it on the same port."""
        if kill:
            self.kill()
        else:
            self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start(timeout)

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of the broker's log, for failure messages."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-max_chars:]
        return "(no log)"

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __repr__(self) -> str:
        return f"MosquittoBroker(url={self.url!r}, pid={self.pid}, persistence={self.persistence})"


def amqtt_config(host: str, port: int) -> dict[str, Any]:
    """The embedded broker's config: one anonymous TCP listener, no $SYS topics."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "sys_interval": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def quiet_amqtt_loggers() -> dict[str, int]:
    """Set amqtt's chatty loggers to WARNING; returns the old levels for :func:`restore_levels`."""
    old = {}
    for name in AMQTT_LOGGERS:
        logger = logging.getLogger(name)
        old[name] = logger.level
        logger.setLevel(logging.WARNING)
    return old


def restore_levels(levels: dict[str, int]) -> None:
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@dataclass(frozen=True, slots=True)
class EmbeddedBroker:
    """A started amqtt broker in the test's event loop."""

    host: str
    port: int
    broker: Any

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"
