"""The embedded MQTT broker (amqtt), for the demo and small sites: no external service to install.

amqtt 0.12.1 speaks MQTT 3.1.1 only; the bus negotiates down to it on its own. Production and the
test suite use Mosquitto.
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)


class EmbeddedBrokerError(Exception):
    pass


class EmbeddedBroker:
    """``async with EmbeddedBroker(host, port) as broker: broker.url``. Port 0 picks a free one."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        from amqtt.broker import Broker  # imported here: only the embedded mode pays for it

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        try:
            await self._broker.start()
        except Exception as exc:
            raise EmbeddedBrokerError(
                f"cannot start the embedded broker on {self.host}:{self.port}: {exc}; "
                "choose another port with --broker-port, or stop what is using it"
            ) from exc
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
