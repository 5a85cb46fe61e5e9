"""Power control through a host's BMC, over IPMI 2.0 (RMCP+, "lanplus") with pyghmi's client.

pyghmi is synchronous, so every exchange runs in a worker thread of a small pool kept for BMC calls,
bounded by an asyncio timeout. Each call logs in, does its work and logs out again: power operations
are rare, a fresh session survives a BMC reboot that a long-lived one would not, and an idle
controller holds none of the BMC's few session slots. Calls to one BMC are serialised; a call that
times out still owns the BMC until pyghmi gives up on its own (a few seconds), and the next call
waits for that within its own timeout, so two sessions never interleave on one BMC.

What the methods do on the wire:
- ``status``: Get Chassis Status.
- ``power_on`` / ``power_off``: Get Chassis Status (nothing more when the chassis is already there),
  Chassis Control (up, down, or soft-off for ``soft=True``), then Get Chassis Status until the new
  state shows, for at most ``confirm_s`` (``soft_off_s`` for a soft power-off, which waits for the
  host's OS).
- ``verify_wake_path``: an authenticated login (at OPERATOR privilege or more, which Chassis Control
  needs) and Get Chassis Status, plus Get Chassis Capabilities, reported but not required.
- ``power_reading_w``: DCMI Get Power Reading; None when the BMC does not implement DCMI (OpenIPMI's
  ``ipmi_sim`` does not) or reports that it is not measuring.

Tested against a real BMC peer: OpenIPMI's ``ipmi_sim``, with ``ipmitool`` as an independent client
(``tests/controller/hardware/test_ipmi.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pyghmi import exceptions as pyghmi_exceptions
from pyghmi.ipmi import command as pyghmi_command

from controller.hardware.driver import PowerDriver, PowerError, PowerState, WakeCheck

__all__ = ["BmcConfig", "IpmiDriver", "parse_dcmi_power_reading"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Threads for blocking BMC calls, apart from asyncio's default pool: a fleet of dead BMCs must not
#: starve other users of ``asyncio.to_thread``, and an abandoned call must not hold up loop shutdown.
_BMC_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="fleetvisor-bmc")

#: IPMI privilege levels. pyghmi asks for ADMINISTRATOR and settles for OPERATOR, the least that
#: Chassis Control needs, so a session that logs in at all may switch power.
_PRIVILEGES = {1: "CALLBACK", 2: "USER", 3: "OPERATOR", 4: "ADMINISTRATOR"}

#: pyghmi's messages when the BMC refused the login itself (RAKP status codes, password check).
_LOGIN_REFUSALS = (
    "Incorrect password provided",
    "Unauthorized name",
    "Invalid integrity check value",
    "Unauthorized role or privilege level requested",
    "Invalid role",
    "Unauthorized GUID",
    "Password is too long",
    "Invalid username length",
)
#: pyghmi's messages when the BMC did not answer (a login that timed out has no message at all).
_NO_ANSWER = ("", "None", "Session no longer connected", "timeout")

#: Completion codes that mean "this BMC does not do DCMI power readings" rather than "it failed".
#: (invalid command, parameter out of range, invalid data field, not in this state, sub-function
#: disabled).
_DCMI_UNSUPPORTED = {0xC1, 0xC9, 0xCC, 0xD5, 0xD6}

_CHASSIS_NETFN = 0x00
_GET_CHASSIS_CAPABILITIES = 0x00
_GET_CHASSIS_STATUS = 0x01
_CHASSIS_CONTROL = 0x02
#: Chassis Control request codes (IPMI 2.0, section 28.3): power down, power up, soft shutdown (ACPI).
_CHASSIS_CONTROL_CODES = {"off": 0x00, "on": 0x01, "soft-off": 0x05}
_DCMI_NETFN = 0x2C
_DCMI_GET_POWER_READING = 0x02
_DCMI_GROUP = 0xDC


@dataclass(frozen=True, slots=True, kw_only=True)
class BmcConfig:
    """How to reach one host's BMC. The password stays out of ``repr`` (and so out of logs)."""

    host_id: str
    address: str
    username: str
    password: str = field(repr=False)
    port: int = 623
    #: One exchange with the BMC, login included.
    timeout_s: float = 10.0
    #: How long a hard power on/off may take to show in the chassis status.
    confirm_s: float = 30.0
    #: How long the host's OS gets to shut down after a soft power-off request.
    soft_off_s: float = 300.0
    #: Interval between chassis status polls while waiting for a power change.
    poll_s: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if not self.address:
            problems.append("address is empty")
        if not 0 < self.port < 65536:
            problems.append(f"port {self.port} is not a UDP port")
        for name in ("timeout_s", "confirm_s", "soft_off_s", "poll_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError(f"host {self.host_id!r}: invalid BMC settings: {'; '.join(problems)}")

    @property
    def target(self) -> str:
        """The BMC as people name it in messages: ``BMC 10.0.0.5:623``."""
        return f"BMC {self.address}:{self.port}"


def parse_dcmi_power_reading(data: bytes) -> float | None:
    """Current watts from a DCMI Get Power Reading response (without its completion code).

    The layout (DCMI 1.5, Get Power Reading): group extension 0xDC, then current, minimum, maximum and
    average watts (16-bit little-endian each), a timestamp, the statistics period, and a state byte
    whose bit 6 says whether the BMC is measuring. Returns None when it is not, or when the response
    is not a power reading at all.
    """
    if len(data) < 3 or data[0] != _DCMI_GROUP:
        return None
    if len(data) >= 18 and not data[17] & 0x40:
        return None
    (current,) = struct.unpack_from("<H", data, 1)
    return float(current)


class _NotConfirmed(Exception):
    """The BMC accepted a power change, but the chassis did not report the new state in time."""

    def __init__(self, wanted: str, last: str, waited_s: float) -> None:
        super().__init__(f"wanted {wanted}, still {last} after {waited_s:g}s")
        self.wanted = wanted
        self.last = last
        self.waited_s = waited_s


# -- blocking work, in a BMC thread -----------------------------------------------------------------


def _with_session(config: BmcConfig, work: Callable[[Any], T]) -> T:
    """Log in, run ``work(command)``, and log out whatever happened."""
    # Credentials go in as bytes: pyghmi 1.6.19 files a half-open session under the credentials it was
    # given but removes it under their encoded form, so with str credentials the entry outlives the
    # session and every later login with them gets the dead session back.
    cmd = pyghmi_command.Command(
        bmc=config.address,
        userid=config.username.encode(),
        password=config.password.encode(),
        port=config.port,
    )
    try:
        return work(cmd)
    finally:
        try:
            cmd.ipmi_session.logout()
        except Exception:  # the answer is in hand; a lost logout only leaves a session to time out
            log.debug("logout from %s failed", config.target, exc_info=True)


def _chassis(cmd: Any, command: int, data: tuple[int, ...] = ()) -> bytes:
    """One chassis command; its response data (without the completion code).

    Raw rather than pyghmi's get_power/set_power: those first identify the BMC's vendor (another
    exchange, more with some vendors' handlers) for power quirks that pyghmi 1.6.19 has none of.
    """
    response = cmd.raw_command(netfn=_CHASSIS_NETFN, command=command, data=data)
    if "error" in response:
        raise pyghmi_exceptions.IpmiException(response["error"], response.get("code", 0))
    return bytes(response["data"])


def _get_power(cmd: Any) -> str:
    status = _chassis(cmd, _GET_CHASSIS_STATUS)
    if not status:
        raise pyghmi_exceptions.BmcErrorException("empty Get Chassis Status response")
    return "on" if status[0] & 0x01 else "off"


def _blocking_status(config: BmcConfig, *, stop: threading.Event) -> str:
    return _with_session(config, _get_power)


def _blocking_set_power(
    config: BmcConfig, request: Literal["on", "off", "soft-off"], wait_s: float, *, stop: threading.Event
) -> None:
    wanted = "on" if request == "on" else "off"

    def work(cmd: Any) -> None:
        if _get_power(cmd) == wanted:
            return
        _chassis(cmd, _CHASSIS_CONTROL, (_CHASSIS_CONTROL_CODES[request],))
        started = time.monotonic()
        while True:
            state = _get_power(cmd)
            if state == wanted:
                return
            if time.monotonic() - started >= wait_s:
                raise _NotConfirmed(wanted, state, wait_s)
            if stop.wait(config.poll_s):
                return  # the caller gave up (timeout, cancellation): stop polling the BMC

    _with_session(config, work)


def _blocking_wake_check(config: BmcConfig, *, stop: threading.Event) -> str:
    def work(cmd: Any) -> str:
        state = _get_power(cmd)
        privilege = int(getattr(cmd.ipmi_session, "privlevel", 0) or 0)
        caps = cmd.raw_command(netfn=_CHASSIS_NETFN, command=_GET_CHASSIS_CAPABILITIES)
        caps_note = (
            "chassis capabilities answered"
            if "error" not in caps
            else f"chassis capabilities not available ({caps['error']})"
        )
        return (
            f"authenticated as {config.username!r} ({_PRIVILEGES.get(privilege, f'level {privilege}')}); "
            f"chassis power is {state}; {caps_note}"
        )

    return _with_session(config, work)


def _blocking_power_reading(config: BmcConfig, *, stop: threading.Event) -> float | None:
    def work(cmd: Any) -> float | None:
        response = cmd.raw_command(
            netfn=_DCMI_NETFN, command=_DCMI_GET_POWER_READING, data=(_DCMI_GROUP, 0x01, 0x00, 0x00)
        )
        if "error" in response:
            if response.get("code") in _DCMI_UNSUPPORTED:
                return None
            raise pyghmi_exceptions.IpmiException(response["error"], response.get("code", 0))
        return parse_dcmi_power_reading(bytes(response["data"]))

    return _with_session(config, work)


def _consume_late_result(future: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a call its caller stopped waiting for, so it is not reported as lost."""
    if not future.cancelled() and future.exception() is not None:
        log.debug("a timed-out BMC call ended later with: %s", future.exception())


# -- the driver -------------------------------------------------------------------------------------


class IpmiDriver(PowerDriver):
    """Power control through one host's BMC. See the module docstring for what goes on the wire."""

    method = "ipmi"

    def __init__(self, config: BmcConfig, executor: concurrent.futures.Executor | None = None) -> None:
        self.config = config
        self.host_id = config.host_id
        self._executor = executor if executor is not None else _BMC_THREADS
        self._lock = asyncio.Lock()
        #: The thread-side future of the last call, which may outlive a caller that timed out.
        self._inflight: asyncio.Future[Any] | None = None

    def __repr__(self) -> str:
        return f"IpmiDriver({self.config!r})"

    async def status(self) -> PowerState:
        state = await self._call(
            "power status", _blocking_status, self.config, timeout_s=self.config.timeout_s
        )
        return "on" if state == "on" else "off"

    async def power_on(self) -> None:
        config = self.config
        await self._call(
            "power on",
            _blocking_set_power,
            config,
            "on",
            config.confirm_s,
            timeout_s=config.timeout_s + config.confirm_s,
        )

    async def power_off(self, soft: bool = False) -> None:
        config = self.config
        wait_s = config.soft_off_s if soft else config.confirm_s
        await self._call(
            "soft power off" if soft else "power off",
            _blocking_set_power,
            config,
            "soft-off" if soft else "off",
            wait_s,
            timeout_s=config.timeout_s + wait_s,
        )

    async def verify_wake_path(self) -> WakeCheck:
        try:
            detail = await self._call(
                "wake-path check", _blocking_wake_check, self.config, timeout_s=self.config.timeout_s
            )
        except PowerError as exc:
            return WakeCheck(ok=False, method=self.method, detail=str(exc))
        return WakeCheck(ok=True, method=self.method, detail=f"{self.config.target}: {detail}")

    async def power_reading_w(self) -> float | None:
        return await self._call(
            "power reading", _blocking_power_reading, self.config, timeout_s=self.config.timeout_s
        )

    # -- plumbing ---------------------------------------------------------------------------------

    def _fail(self, action: str, reason: str, fix: str) -> PowerError:
        return self.fail(self.config.target, action, reason, fix)

    async def _call(self, action: str, fn: Callable[..., T], *args: Any, timeout_s: float) -> T:
        """Run ``fn(*args, stop=event)`` in a BMC thread, one at a time per BMC, within ``timeout_s``;
        ``event`` is set when the caller stops waiting.

        Raises:
            PowerError: for every failure, with the reason and the fix.
        """
        loop = asyncio.get_running_loop()
        talking = False  # False while waiting for this BMC's previous call to finish
        deadline = asyncio.timeout(timeout_s)
        stop = threading.Event()
        try:
            async with deadline, self._lock:
                if self._inflight is not None and not self._inflight.done():
                    await asyncio.wait([self._inflight])
                talking = True
                future: asyncio.Future[T] = loop.run_in_executor(
                    self._executor, functools.partial(fn, *args, stop=stop)
                )
                future.add_done_callback(_consume_late_result)
                self._inflight = future
                # Shielded: a timeout abandons the thread's answer but cannot stop the thread,
                # and _inflight must stay pending until the thread is really done.
                try:
                    return await asyncio.shield(future)
                finally:
                    # Timed out or cancelled: tell the thread, so a power-change wait ends at its next
                    # poll instead of running on for confirm_s (and holding up interpreter exit).
                    stop.set()
        except TimeoutError as exc:
            raise self._timeout(
                action, exc, ours=deadline.expired(), talking=talking, timeout_s=timeout_s
            ) from (None if deadline.expired() else exc)
        except _NotConfirmed as exc:
            raise self._fail(
                action,
                f"the BMC accepted the request, but the chassis still reports {exc.last} "
                f"after {exc.waited_s:g}s",
                "check the host's power supply and the BMC's event log (ipmitool sel list); "
                + (
                    "the OS may have refused to shut down: power off without soft"
                    if action == "soft power off"
                    else "raise confirm_s if this host is slow to change power"
                ),
            ) from None
        except pyghmi_exceptions.PyghmiException as exc:
            reason, fix = self._explain(action, exc)
            raise self._fail(action, reason, fix) from exc
        except OSError as exc:
            raise self._network(action, exc) from exc
        except Exception as exc:  # pyghmi trips over some malformed answers with plain Python errors
            log.warning("host %s: pyghmi failed on %s", self.host_id, action, exc_info=True)
            raise self._fail(
                action,
                f"the BMC's answer could not be handled ({exc!r})",
                "retry; if it persists, capture the exchange with ipmitool -v and report it",
            ) from exc

    def _timeout(
        self, action: str, exc: TimeoutError, *, ours: bool, talking: bool, timeout_s: float
    ) -> PowerError:
        """The error of a call that timed out: inside pyghmi, waiting for the BMC, or behind another call."""
        if not ours:  # a socket timeout inside pyghmi, not ours
            return self._fail(
                action,
                f"network timeout talking to the BMC: {exc}",
                f"check that the BMC is reachable from this controller on UDP port {self.config.port}",
            )
        if talking:
            return self._fail(
                action,
                f"no answer within {timeout_s:g}s",
                f"check that the BMC is powered and reachable from this controller on UDP port "
                f"{self.config.port}, and that its address is right",
            )
        return self._fail(
            action,
            f"the previous call to this BMC was still running after {timeout_s:g}s",
            "retry later; if it keeps happening the BMC is unreachable or very slow",
        )

    def _network(self, action: str, exc: OSError) -> PowerError:
        """The error of a call that failed on the network (name resolution or the route)."""
        if isinstance(exc, socket.gaierror):
            return self._fail(
                action,
                f"cannot resolve the BMC address {self.config.address!r} ({exc})",
                "fix the address in this host's BMC settings",
            )
        return self._fail(
            action,
            f"network error talking to the BMC: {exc}",
            "check this controller's route to the BMC network",
        )

    def _explain(self, action: str, exc: pyghmi_exceptions.PyghmiException) -> tuple[str, str]:
        """(reason, fix) for a pyghmi exception."""
        message = str(exc).strip()
        if any(message.startswith(refusal) for refusal in _LOGIN_REFUSALS):
            return (
                f"the BMC refused the login of user {self.config.username!r} ({message})",
                "check the username and password in this host's BMC settings against the BMC's user "
                "list, and that the user may log in over LAN as OPERATOR or ADMINISTRATOR",
            )
        if message in _NO_ANSWER:
            return (
                "no answer from the BMC" + (f" ({message})" if message not in ("", "None") else ""),
                f"check that the BMC is powered and reachable from this controller on UDP port "
                f"{self.config.port}, and that its address is right",
            )
        code = getattr(exc, "ipmicode", 0)
        reason = f"the BMC refused the request: {message}" + (
            f" (completion code {code:#04x})" if code else ""
        )
        if action == "soft power off":
            return reason, "this BMC cannot ask the host's OS to shut down; power off without soft"
        return (
            reason,
            "check that the BMC supports this command and that the user has ADMINISTRATOR privilege",
        )
