"""WakeOnLanDriver: the magic packet's bytes, received on a real UDP socket, and what WoL cannot do."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from controller.hardware import PowerError, WakeOnLanDriver, WolConfig
from controller.hardware.wol import magic_packet, parse_mac

MAC = "52:54:00:12:34:56"
MAC_BYTES = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    """A UDP socket on a free loopback port, standing in for the sleeping host's network card."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2.0)
        yield sock


def _driver(receiver: socket.socket, **overrides: Any) -> WakeOnLanDriver:
    config = WolConfig(mac=MAC, broadcast="127.0.0.1", port=receiver.getsockname()[1])
    return WakeOnLanDriver("h1", dataclasses.replace(config, **overrides))


async def test_power_on_sends_the_magic_packet(receiver: socket.socket) -> None:
    """Pins the packet on the wire: 6 x 0xFF then the MAC 16 times (102 bytes), sent `repeat` times."""
    await _driver(receiver, repeat=3).power_on()

    packets = [receiver.recv(1024) for _ in range(3)]
    assert packets[0] == b"\xff" * 6 + MAC_BYTES * 16
    assert len(packets[0]) == 102
    assert packets == [packets[0]] * 3


def test_mac_addresses_are_parsed_in_the_usual_spellings() -> None:
    """Pins the MAC spellings accepted (colons, dashes, Cisco dots, bare hex) and that others are refused."""
    for spelling in (
        "52:54:00:12:34:56",
        "52-54-00-12-34-56",
        "5254.0012.3456",
        "525400123456",
        "52:54:00:12:34:56 ",
    ):
        assert parse_mac(spelling) == MAC_BYTES
    for bad in ("52:54:00:12:34", "52:54-00:12:34:56", "zz:54:00:12:34:56", ""):
        with pytest.raises(ValueError, match="is not a MAC address"):
            parse_mac(bad)
    assert magic_packet("AA:BB:CC:DD:EE:FF").endswith(bytes.fromhex("aabbccddeeff") * 16)


async def test_verify_wake_path_sends_a_probe_that_wakes_nothing(receiver: socket.socket) -> None:
    """Pins that the check reaches the address with an empty datagram, not a magic packet, and says so."""
    check = await _driver(receiver).verify_wake_path()

    assert check.ok, check.detail
    assert check.method == "wol"
    assert receiver.recv(1024) == b""
    assert "cannot be verified end to end without waking the host" in check.detail


async def test_verify_wake_path_fails_for_a_malformed_mac(receiver: socket.socket) -> None:
    """Pins that a bad MAC fails the check (without raising) and power_on says to fix it."""
    driver = _driver(receiver, mac="52:54:00:12:34")

    check = await driver.verify_wake_path()
    assert not check.ok
    assert "'52:54:00:12:34' is not a MAC address" in check.detail

    with pytest.raises(PowerError, match="fix the MAC in this host's Wake-on-LAN settings"):
        await driver.power_on()


async def test_verify_wake_path_fails_for_a_missing_interface(receiver: socket.socket) -> None:
    """Pins that an interface that does not exist fails the check with the interface named."""
    check = await _driver(receiver, interface="fvnosuch0").verify_wake_path()

    assert not check.ok
    assert "cannot send out of interface 'fvnosuch0'" in check.detail


async def test_a_hostname_for_broadcast_is_refused_rather_than_resolved(receiver: socket.socket) -> None:
    """Pins that the broadcast address must be an IPv4 literal (sending never waits on DNS)."""
    with pytest.raises(PowerError, match="broadcast address 'localhost' is not an IPv4 address"):
        await _driver(receiver, broadcast="localhost").power_on()


async def test_wol_cannot_power_off_or_read_the_state(receiver: socket.socket) -> None:
    """Pins that WoL says 'unknown' for the state and refuses power-off with the way out."""
    driver = _driver(receiver)

    assert await driver.status() == "unknown"
    assert not driver.can_power_off
    with pytest.raises(PowerError) as caught:
        await driver.power_off()
    assert str(caught.value) == (
        f"host 'h1': power off via wol (WoL {MAC} to 127.0.0.1:{receiver.getsockname()[1]}) failed: "
        "Wake-on-LAN cannot power a host off; pair it with a method that can (IPMI) in a fallback chain"
    )
