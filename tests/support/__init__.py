"""Helpers shared by the test suite: free ports, real brokers, sample messages.

Import what you need from the submodules (``tests.support.brokers``, ``tests.support.samples``);
this package re-exports the few names most tests use.
"""

from __future__ import annotations

import socket

from tests.support.brokers import EmbeddedBroker, MosquittoBroker, find_mosquitto

__all__ = ["EmbeddedBroker", "MosquittoBroker", "find_mosquitto", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
