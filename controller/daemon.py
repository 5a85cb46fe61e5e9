"""The controller process: store, bus, fleet service and HTTP API, optionally with its own broker.

``async with Controller(settings) as controller:`` brings everything up in order (broker, store,
bus, operations resumed, API listening) and takes it down in reverse. Operations still running at
shutdown stay ``running`` in the store and are resumed by the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import uvicorn

from controller.api import create_app
from controller.auth import Authority
from controller.embedded_broker import EmbeddedBroker
from controller.fleet import FleetService, FleetSettings
from controller.store import Store
from protocols.bus import Bus, BusSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    broker_url: str = "mqtt://127.0.0.1:1883"
    #: Run an amqtt broker inside this process on ``broker_url``'s port (0: a free one).
    embedded_broker: bool = False
    embedded_broker_port: int = 1883
    db_path: pathlib.Path = field(default_factory=lambda: default_db_path())
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    serve_api: bool = True
    client_id: str = "fv-controller"
    username: str | None = None
    password: str | None = None
    fleet: FleetSettings = field(default_factory=FleetSettings)
    #: Require API bearer tokens. The first start creates an admin token in ``admin_token_path``.
    auth: bool = False
    #: Serve the API over HTTPS with this certificate and key (see `fleetvisor ca`).
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    admin_token_path: pathlib.Path | None = None
    bus_overrides: dict[str, Any] = field(default_factory=dict)


def default_db_path() -> pathlib.Path:
    base = os.environ.get("XDG_STATE_HOME") or str(pathlib.Path.home() / ".local" / "state")
    return pathlib.Path(base) / "fleetvisor" / "controller.sqlite"


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the process owner decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.broker: EmbeddedBroker | None = None
        self.store: Store | None = None
        self.bus: Bus | None = None
        self.telemetry_bus: Bus | None = None
        self.authority: Authority | None = None
        self.service: FleetService | None = None
        self._server: _Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()

    @property
    def api_url(self) -> str:
        scheme = "https" if self.settings.tls_cert else "http"
        return f"{scheme}://{self.settings.api_host}:{self.settings.api_port}"

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        s = self.settings
        broker_url = s.broker_url
        if s.embedded_broker:
            self.broker = await self._stack.enter_async_context(
                EmbeddedBroker("127.0.0.1", s.embedded_broker_port)
            )
            broker_url = self.broker.url
        self.store = Store(s.db_path)
        self._stack.callback(self.store.close)
        self.bus = Bus(
            BusSettings(
                url=broker_url,
                client_id=s.client_id,
                username=s.username,
                password=s.password,
                **s.bus_overrides,
            )
        )
        # Telemetry has its own connection: QoS 0 needs no session and no MQTT 5 feature, and paho
        # decodes MQTT 5 properties on every PUBLISH, which measured 121 us of CPU per message against
        # 46 us over 3.1.1 (bench/ingest). It also keeps replies from queuing behind telemetry bursts.
        telemetry_overrides = {**s.bus_overrides, "protocol": "3.1.1", "persistent_session": False}
        self.telemetry_bus = Bus(
            BusSettings(
                url=broker_url,
                client_id=f"{s.client_id}-telemetry",
                username=s.username,
                password=s.password,
                **telemetry_overrides,
            )
        )
        self.service = FleetService(self.store, self.bus, s.fleet, telemetry_bus=self.telemetry_bus)
        self._stack.push_async_callback(self.service.close)
        await self._stack.enter_async_context(self.telemetry_bus)
        await self._stack.enter_async_context(self.bus)
        self.service.start()
        if s.serve_api:
            await self._serve_api()
        log.info(
            "controller up: store %s, broker %s%s",
            s.db_path,
            broker_url,
            f", API {self.api_url}/api/v1" if s.serve_api else "",
        )

    async def _serve_api(self) -> None:
        assert self.service is not None
        s = self.settings
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.api_host, s.api_port))
        except OSError as exc:
            sock.close()
            raise OSError(
                f"cannot serve the API on {s.api_host}:{s.api_port}: {exc.strerror}; "
                "choose another port with --port, or stop what is using it"
            ) from None
        if s.api_port == 0:
            self.settings = _replace_port(s, sock.getsockname()[1])
        assert self.store is not None
        self.authority = Authority(self.store.connection, enabled=s.auth)
        token_path = s.admin_token_path or s.db_path.parent / "admin.token"
        if self.authority.ensure_admin_token(token_path) is not None:
            log.warning("API auth is on: created the first admin token in %s (mode 0600)", token_path)
        config = uvicorn.Config(
            create_app(self.service, self.authority),
            ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
            ssl_keyfile=str(s.tls_key) if s.tls_key else None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="none",
        )
        self._server = _Server(config)
        self._server_task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[sock]), name="api"
        )
        self._stack.push_async_callback(self._stop_api)
        while not self._server.started:
            if self._server_task.done():
                self._server_task.result()
                raise RuntimeError("the API server stopped during start-up")
            await asyncio.sleep(0.01)

    async def _stop_api(self) -> None:
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server_task, 5.0)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()


def _replace_port(settings: ControllerSettings, port: int) -> ControllerSettings:
    import dataclasses

    return dataclasses.replace(settings, api_port=port)


async def run_controller(settings: ControllerSettings, stop: asyncio.Event) -> None:
    async with Controller(settings):
        await stop.wait()
