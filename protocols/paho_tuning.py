"""What the bus changes in aiomqtt's paho client once it is connected (:func:`tune`), and why.

paho is tuned for many small clients; the controller is one client reading every host's stream.
Each change below was measured (bench/ingest, bench/ha) and reaches into paho's internals, which
aiomqtt exposes as ``client._client``: they are kept here, in one place, with the reason for each.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any, Final

import aiomqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.matcher import MQTTMatcher

#: Packets one readable event of the socket may read (see :func:`_read_bursts`).
READ_BURST: Final = 1000


def tune(client: aiomqtt.Client) -> None:
    """Apply every change below to a freshly connected client."""
    _no_delay(client)
    _read_bursts(client)
    _skip_callback_matching(client)


def _no_delay(client: aiomqtt.Client) -> None:
    """Turn Nagle's algorithm off on the client's socket: every message here is small and someone
    waits for it. With Nagle on, a command sent while an earlier packet is unacknowledged waits for
    the peer's delayed ACK, 40 ms on Linux, on every hop (paho leaves the socket as it is).
    """
    sock = client._client.socket()  # aiomqtt's paho client; paho has no option for this
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _read_bursts(client: aiomqtt.Client) -> None:
    """Let each readable event read up to ``READ_BURST`` packets, not one.

    aiomqtt calls paho's ``loop_read`` once per readable event, and for QoS 0 traffic paho reads one
    packet per call: the socket then drains one message per event-loop turn, and a flood from one
    sender stays in the kernel's buffer in front of every other sender's messages (their heartbeats),
    out of reach of any admission. Reading until the socket would block (bounded, so other tasks
    still run) lets the admission see and drop the flood at the rate it arrives.
    """
    paho = client._client

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        for _ in range(READ_BURST):
            if paho._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = paho._packet_read()
            if rc > 0:
                return paho._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    paho.loop_read = loop_read  # type: ignore[method-assign]


class _NoFilteredCallbacks(MQTTMatcher):
    """paho's table of per-topic message callbacks, for a client that never adds one."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def iter_match(self, topic: str) -> Iterator[Any]:
        return iter(())


def _skip_callback_matching(client: aiomqtt.Client) -> None:
    """Spare each incoming message paho's walk of its per-topic callback table.

    paho matches every message's topic against the callbacks added with ``message_callback_add``
    before it calls ``on_message``. aiomqtt adds none, so the walk always finds nothing, and at the
    ingest ceiling it cost a tenth of the controller's CPU (profiled with bench/ingest).
    """
    client._client._on_message_filtered = _NoFilteredCallbacks()
