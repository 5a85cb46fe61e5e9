"""Wake-on-LAN: switch a host on by broadcasting a magic packet to its network card.

A magic packet is six 0xFF bytes followed by the card's MAC address sixteen times (102 bytes), sent
as a UDP broadcast (port 9, "discard", by convention). A sleeping card that has Wake-on-LAN enabled
wakes its host when it sees one.

It is a one-way street: nothing answers, so this method cannot confirm that the host woke, cannot read
its power state (``status`` is ``unknown``) and cannot power it off. Pair it with a method that can,
in a :class:`controller.hardware.chain.FallbackPower`: typically IPMI first, WoL as the fallback wake.
IPv4 only; the broadcast address must be an IP literal, so sending never blocks on DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import pathlib
import re
import socket
from dataclasses import dataclass

import msgspec

from controller.hardware.driver import PowerDriver, PowerError, PowerState, WakeCheck

__all__ = ["WakeOnLanDriver", "WolConfig", "load_wol_config", "magic_packet", "parse_mac"]

_MAC_RE = re.compile(
    r"(?:[0-9a-f]{2}([:-])(?:[0-9a-f]{2}\1){4}[0-9a-f]{2})"  # aa:bb:cc:dd:ee:ff or aa-bb-...
    r"|(?:[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4})"  # aabb.ccdd.eeff
    r"|(?:[0-9a-f]{12})",  # aabbccddeeff
    re.IGNORECASE,
)


def parse_mac(text: str) -> bytes:
    """The six bytes of a MAC address written ``aa:bb:cc:dd:ee:ff``, with ``-``, as ``aabb.ccdd.eeff``
    or as twelve hex digits.

    Raises:
        ValueError: ``text`` is none of these.
    """
    if not _MAC_RE.fullmatch(text.strip()):
        raise ValueError(f"{text!r} is not a MAC address (expected six hex pairs, e.g. 52:54:00:12:34:56)")
    return bytes.fromhex(re.sub(r"[:.\-]", "", text.strip()))


def magic_packet(mac: str) -> bytes:
    """The 102-byte Wake-on-LAN magic packet for ``mac``.

    Raises:
        ValueError: ``mac`` is not a MAC address.
    """
    return b"\xff" * 6 + parse_mac(mac) * 16


@dataclass(frozen=True, slots=True, kw_only=True)
class WolConfig:
    """Where to send one host's magic packet."""

    mac: str
    #: An IPv4 literal: the limited broadcast, or the directed broadcast of the host's subnet.
    broadcast: str = "255.255.255.255"
    port: int = 9
    #: Send out of this network interface (SO_BINDTODEVICE; needs CAP_NET_RAW), when several could.
    interface: str | None = None
    #: How many copies to send: it is UDP, and nothing says whether one arrived.
    repeat: int = 3
    timeout_s: float = 2.0

    @property
    def target(self) -> str:
        via = f" via {self.interface}" if self.interface else ""
        return f"WoL {self.mac} to {self.broadcast}:{self.port}{via}"


class WakeOnLanDriver(PowerDriver):
    """Wakes one host with magic packets. It cannot power off or tell the power state."""

    method = "wol"
    can_power_off = False

    def __init__(self, host_id: str, config: WolConfig) -> None:
        self.host_id = host_id
        self.config = config

    def __repr__(self) -> str:
        return f"WakeOnLanDriver({self.host_id!r}, {self.config!r})"

    async def status(self) -> PowerState:
        return "unknown"

    async def power_on(self) -> None:
        """Send the magic packet ``repeat`` times. Success means sent, not that the host woke.

        Raises:
            PowerError: the MAC or address is malformed, or the packet could not be sent.
        """
        try:
            packet = magic_packet(self.config.mac)
        except ValueError as exc:
            raise self._fail(
                "power on", str(exc), "fix the MAC in this host's Wake-on-LAN settings"
            ) from None
        sock = self._open("power on")
        try:
            async with asyncio.timeout(self.config.timeout_s):
                loop = asyncio.get_running_loop()
                for _ in range(max(1, self.config.repeat)):
                    await loop.sock_sendto(sock, packet, (self.config.broadcast, self.config.port))
        except TimeoutError:
            raise self._fail(
                "power on",
                f"the magic packet could not be sent within {self.config.timeout_s:g}s",
                "check this controller's network interface",
            ) from None
        except OSError as exc:
            raise self._send_error("power on", exc) from exc
        finally:
            sock.close()

    async def power_off(self, soft: bool = False) -> None:
        """Always fails: there is no magic packet for off.

        Raises:
            PowerError: always.
        """
        raise self._fail(
            "soft power off" if soft else "power off",
            "Wake-on-LAN cannot power a host off",
            "pair it with a method that can (IPMI) in a fallback chain",
        )

    async def verify_wake_path(self) -> WakeCheck:
        """Check what can be checked without waking anything: the MAC, and that a socket to the
        broadcast address opens, routes and accepts an empty probe datagram (not a magic packet).
        """
        config = self.config
        try:
            parse_mac(config.mac)
            sock = self._open("wake-path check")
        except (ValueError, PowerError) as exc:
            return WakeCheck(ok=False, method=self.method, detail=f"{config.target}: {exc}")
        try:
            async with asyncio.timeout(config.timeout_s):
                # The kernel routes an empty datagram and checks broadcast permission and the
                # firewall just as for the magic packet, but no card wakes for it.
                await asyncio.get_running_loop().sock_sendto(sock, b"", (config.broadcast, config.port))
        except TimeoutError:
            return WakeCheck(
                ok=False,
                method=self.method,
                detail=f"{config.target}: a probe datagram could not be sent within {config.timeout_s:g}s",
            )
        except OSError as exc:
            return WakeCheck(
                ok=False, method=self.method, detail=str(self._send_error("wake-path check", exc))
            )
        finally:
            sock.close()
        return WakeCheck(
            ok=True,
            method=self.method,
            detail=(
                f"{config.target}: the MAC is well-formed and the broadcast address is reachable from "
                "here (an empty probe was sent, not a magic packet). Wake-on-LAN cannot be verified end "
                "to end without waking the host: that its card has WoL enabled (ethtool: 'Wake-on: g') "
                "and that the broadcast reaches its network segment is unchecked"
            ),
        )

    # -- plumbing ---------------------------------------------------------------------------------

    def _fail(self, action: str, reason: str, fix: str) -> PowerError:
        return self.fail(self.config.target, action, reason, fix)

    def _open(self, action: str) -> socket.socket:
        """A non-blocking UDP socket allowed to broadcast, bound to the interface if one is set.

        Raises:
            PowerError: the address is not an IPv4 literal, or the socket cannot be set up.
        """
        config = self.config
        try:
            if ipaddress.ip_address(config.broadcast).version != 4:
                raise ValueError("not IPv4")
        except ValueError:
            raise self._fail(
                action,
                f"broadcast address {config.broadcast!r} is not an IPv4 address",
                "set it to 255.255.255.255 or the host subnet's broadcast address, e.g. 10.0.0.255",
            ) from None
        if not 0 < config.port < 65536:
            raise self._fail(action, f"port {config.port} is not a UDP port", "use 9 (or 7)")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if config.interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, config.interface.encode())
        except OSError as exc:
            sock.close()
            if config.interface:
                raise self._fail(
                    action,
                    f"cannot send out of interface {config.interface!r} ({exc.strerror or exc})",
                    "check the interface name (ip link), and that the controller may bind to it "
                    "(CAP_NET_RAW)",
                ) from exc
            raise self._fail(
                action, f"cannot open a UDP socket ({exc})", "check the controller's limits"
            ) from exc
        return sock

    def _send_error(self, action: str, exc: OSError) -> PowerError:
        return self._fail(
            action,
            f"sending to {self.config.broadcast}:{self.config.port} failed ({exc.strerror or exc})",
            "check that this controller has a route to that broadcast address and that no firewall "
            "drops outgoing UDP to it",
        )


class _WolEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    mac: str
    broadcast: str = "255.255.255.255"
    port: int = 9
    interface: str | None = None


def load_wol_config(path: pathlib.Path) -> dict[str, WolConfig]:
    """Per-host Wake-on-LAN settings from a JSON or YAML file (the sibling of the BMC file)::

        {"h1": {"mac": "52:54:00:12:34:56", "broadcast": "10.0.0.255", "port": 9, "interface": "eth1"}}

    Only ``mac`` is required.

    Raises:
        ValueError: the file is unreadable or malformed, or a MAC or broadcast address is not valid.
    """
    try:
        raw = path.read_bytes()
        data = msgspec.yaml.decode(raw) if path.suffix in (".yaml", ".yml") else msgspec.json.decode(raw)
        entries = msgspec.convert(data, dict[str, _WolEntry])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(
            f"Wake-on-LAN config {str(path)!r}: {exc}; see `fleetvisor controller --help`"
        ) from None
    configs = {}
    for host_id, entry in entries.items():
        try:
            parse_mac(entry.mac)
            if ipaddress.ip_address(entry.broadcast).version != 4:
                raise ValueError(f"broadcast {entry.broadcast!r} is not an IPv4 address")
        except ValueError as exc:
            raise ValueError(f"Wake-on-LAN config {str(path)!r}, host {host_id!r}: {exc}") from None
        configs[host_id] = WolConfig(
            mac=entry.mac, broadcast=entry.broadcast, port=entry.port, interface=entry.interface
        )
    return configs
