"""The controller process, and the only place that wires the controller's parts together.

``async with Controller(settings) as controller:`` brings everything up in order (broker, store,
state, services, bus intake, operations resumed, API listening) and takes it down in reverse. The
daemon owns one guarded task set of named long-lived tasks (HA, power rounds, energy, held-back
messages, the API server). Operations still running at shutdown stay ``running`` in the store and
are resumed by the next start.

The parts are attributes of the :class:`Controller`: ``store``, ``events``, ``live``, ``standby``,
``fleet_state``, ``scheduler``, ``rpc``, ``operations``, ``vms``, ``hosts``, ``stale``,
``migrations``, ``evacuations``, ``ha``, ``power``, ``intake``. Each service got the few of them it
needs when it was built; none holds the controller.

It may import every package of the controller.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pathlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import uvicorn

from controller.api import edge
from controller.api.app import ApiParts, create_app
from controller.api.views import Views
from controller.broker.embedded import EmbeddedBroker
from controller.common.tasks import TaskSet
from controller.hardware import load_wol_config
from controller.hardware.fencing import load_bmc_config
from controller.intake.subscriptions import Intake
from controller.scheduler import FleetState, Scheduler, SchedulerSettings
from controller.security.auth import Authority
from controller.services.agent_rpc import AgentRpc
from controller.services.bulk import BulkActions
from controller.services.cleanup import StaleCopies
from controller.services.ha.detector import DetectorSettings
from controller.services.ha.manager import HaService, HaSettings
from controller.services.hosts import HostService, HostSettings
from controller.services.migration.evacuation import Evacuations
from controller.services.migration.migrate import MigrationService, MigrationSettings
from controller.services.moves import VmMoves
from controller.services.operations import Operations
from controller.services.power import PowerService, PowerSettings
from controller.services.rolling import RollingMaintenance
from controller.services.vms import VmService, VmSettings
from controller.state import retention as retention_flags
from controller.state.events import EventHub
from controller.state.live import LiveState, StandbyHosts
from controller.state.retention import Retention, RetentionSettings
from controller.state.store import Store
from protocols.bus import Bus, BusSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """The settings of the controller's services, grouped by service."""

    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    #: How long an operation may take before it fails and releases what it claimed.
    operation_timeout_s: float = 60.0
    #: How long to wait for a reply before sending the command again (same operation id).
    command_retry_s: float = 5.0
    ha: HaSettings = field(default_factory=HaSettings)
    hosts: HostSettings = field(default_factory=HostSettings)
    migration: MigrationSettings = field(default_factory=MigrationSettings)
    power: PowerSettings = field(default_factory=PowerSettings)


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
    #: The API's limits and its checks of Host and Origin.
    edge: edge.EdgeOptions = field(default_factory=lambda: edge.EdgeOptions())
    retention: RetentionSettings = field(default_factory=RetentionSettings)
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
    """The controller: its parts, built and wired at start; see the module docstring."""

    # The parts, set by _start (and by _wire); each one is there once the controller has started.
    store: Store
    events: EventHub
    live: LiveState
    standby: StandbyHosts
    fleet_state: FleetState
    scheduler: Scheduler
    rpc: AgentRpc
    operations: Operations
    vms: VmService
    moves: VmMoves
    hosts: HostService
    stale: StaleCopies
    migrations: MigrationService
    evacuations: Evacuations
    bulk: BulkActions
    rolling: RollingMaintenance
    ha: HaService
    power: PowerService
    intake: Intake
    bus: Bus
    telemetry_bus: Bus

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.broker: EmbeddedBroker | None = None
        self.authority: Authority | None = None
        self._server: _Server | None = None
        self._tasks = TaskSet("controller")
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
                # A user of its own (same password): brokers bind each client id to its user.
                username=f"{s.username}-telemetry" if s.username else None,
                password=s.password,
                **telemetry_overrides,
            )
        )
        self._wire(s.fleet)
        self._stack.push_async_callback(self._close_services)
        await self._stack.enter_async_context(self.telemetry_bus)
        await self._stack.enter_async_context(self.bus)
        self._tasks.spawn(self.ha.run(), name="ha", forever=True)
        self._tasks.spawn(self.power.run_rounds(), name="power:rounds", forever=True)
        self._tasks.spawn(self.power.run_energy(), name="power:energy", forever=True)
        self._tasks.spawn(self.intake.drain_deferred(), name="intake:deferred", forever=True)
        retention = Retention(self.store.connection, s.retention)
        self._tasks.spawn(retention.run(), name="retention", forever=True)
        self.operations.resume()
        if s.serve_api:
            await self._serve_api()
        log.info(
            "controller up: store %s, broker %s%s",
            s.db_path,
            broker_url,
            f", API {self.api_url}/api/v1" if s.serve_api else "",
        )

    def _wire(self, fleet: FleetSettings) -> None:
        """Build the state and the services, each with the collaborators it needs."""
        store = self.store
        self.events = EventHub(store)
        self.live = LiveState()
        self.standby = StandbyHosts()
        hosts = store.hosts()
        #: The scheduler's view of capacity: numpy columns kept in step with the store on every claim,
        #: release, join and liveness change, and resynchronised from the store after each connect.
        self.fleet_state = FleetState.from_records(
            hosts,
            store.usage(),
            {h.host_id: h.labels for h in hosts},
            vms=store.vms(),
            capacity=fleet.scheduler.capacity,
        )
        self.scheduler = Scheduler(self.fleet_state, fleet.scheduler)
        self.rpc = AgentRpc(self.bus, store, fleet.command_retry_s)
        self.operations = Operations(store, self.events)
        vm_settings = VmSettings(
            scheduler=fleet.scheduler,
            operation_timeout_s=fleet.operation_timeout_s,
            host_failures_to_tolerate=fleet.ha.host_failures_to_tolerate,
        )
        self.vms = VmService(
            store,
            self.events,
            self.scheduler,
            self.fleet_state,
            self.operations,
            self.rpc,
            vm_settings,
            health=lambda host_id: self.ha.detector.state(host_id),
        )
        self.moves = VmMoves(
            store, self.events, self.scheduler, self.fleet_state, self.operations, self.rpc, self.vms
        )
        self.stale = StaleCopies(self.rpc, self.events)
        self.hosts = HostService(
            store, self.events, self.live, self.fleet_state, self.rpc, self.stale, fleet.hosts
        )
        self.migrations = MigrationService(
            store, self.events, self.live, self.scheduler, self.fleet_state, self.operations, self.rpc,
            self.vms, self.hosts, fleet.migration,
        )  # fmt: skip
        self.evacuations = Evacuations(
            store, self.events, self.operations, self.hosts, self.vms, self.moves, self.migrations, fleet.migration
        )  # fmt: skip
        self.bulk = BulkActions(store, self.events, self.operations, self.hosts, self.vms, self.migrations)
        self.ha = HaService(
            store, self.events, self.scheduler, self.fleet_state, self.moves, self.standby,
            (self.bus, self.telemetry_bus), fleet.ha,
        )  # fmt: skip
        self.rolling = RollingMaintenance(
            store, self.events, self.operations, self.hosts, self.migrations, self.fleet_state, self.live,
            self.ha.detector.state, fleet.migration,
        )  # fmt: skip
        self.power = PowerService(
            store=store,
            events=self.events,
            live=self.live,
            fleet_state=self.fleet_state,
            standby=self.standby,
            hosts=self.hosts,
            operations=self.operations,
            migrations=self.migrations,
            health=self.ha.detector.state,
            capacity=fleet.scheduler.capacity,
            settings=fleet.power,
        )
        self.bulk.power_action = self.power.host_action
        self.intake = Intake(
            self.bus, self.telemetry_bus, self.live, self.rpc, self.hosts, self.vms, self.migrations, self.ha
        )

    async def _close_services(self) -> None:
        """Stop the long-lived tasks, then each service's own tasks (top layers first)."""
        await self._tasks.close()
        await self.power.close()
        await self.ha.close()
        await self.operations.close()
        await self.stale.close()
        await self.hosts.close()

    def health(self) -> dict[str, Any]:
        """The figures ``GET /health`` shows."""
        return {
            "bus_connected": self.bus.connected.is_set(),
            "hosts_online": self.hosts.online_count(),
            "vms_running": self.vms.running_count(),
            "telemetry_messages": self.live.telemetry_count,
            "bad_messages": self.intake.decoder.stats.rejected,
            "rate_limited_messages": sum(self.intake.limiter.dropped.values()),
        }

    def _api_parts(self, authority: Authority) -> ApiParts:
        views = Views(
            self.store,
            self.live,
            self.settings.fleet.scheduler,
            self.ha.detector.state,
            self.power.host_power,
        )
        return ApiParts(
            store=self.store,
            events=self.events,
            views=views,
            vms=self.vms,
            hosts=self.hosts,
            operations=self.operations,
            migrations=self.migrations,
            evacuations=self.evacuations,
            bulk=self.bulk,
            rolling=self.rolling,
            power=self.power,
            authority=authority,
            health=self.health,
            confirm_down=self.ha.confirm_down,
        )

    async def _serve_api(self) -> None:
        s = self.settings
        edge.check_exposure(s.api_host, s.auth, s.edge)
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
        self.authority = Authority(self.store.connection, enabled=s.auth)
        token_path = s.admin_token_path or s.db_path.parent / "admin.token"
        if self.authority.ensure_admin_token(token_path) is not None:
            log.warning("API auth is on: created the first admin token in %s (mode 0600)", token_path)
        s = self.settings
        config = uvicorn.Config(
            edge.Edge(
                create_app(self._api_parts(self.authority)),
                edge.request_checks(s.edge, s.api_host, s.api_port),
            ),
            **edge.server_limits(s.edge),
            ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
            ssl_keyfile=str(s.tls_key) if s.tls_key else None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="none",
        )
        self._server = _Server(config)
        server_task = self._tasks.spawn(self._server.serve(sockets=[sock]), name="api")
        self._stack.push_async_callback(self._stop_api, server_task)
        while not self._server.started:
            if server_task.done():
                server_task.result()
                raise RuntimeError("the API server stopped during start-up")
            await asyncio.sleep(0.01)

    async def _stop_api(self, server_task: asyncio.Task[None]) -> None:
        if self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(server_task), 5.0)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()


def _replace_port(settings: ControllerSettings, port: int) -> ControllerSettings:
    import dataclasses

    return dataclasses.replace(settings, api_port=port)


# -- the command line -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, broker_url: Callable[[str], str]) -> None:
    """The flags of ``fleetvisor controller``; their defaults are the settings dataclasses' own."""
    cs, fs, ha, det = ControllerSettings(), FleetSettings(), HaSettings(), DetectorSettings()
    p.add_argument(
        "--broker", type=broker_url, default=cs.broker_url, help="MQTT broker URL (default %(default)s)"
    )
    p.add_argument(
        "--embedded-broker", action="store_true", help="run an embedded MQTT broker (amqtt) in-process"
    )
    p.add_argument(
        "--broker-port",
        type=int,
        default=cs.embedded_broker_port,
        help="port of the embedded broker (default %(default)s)",
    )
    p.add_argument("--db", default=str(default_db_path()), help="SQLite state store (default %(default)s)")
    p.add_argument("--listen", default=cs.api_host, help="API address (default %(default)s)")
    p.add_argument("--port", type=int, default=cs.api_port, help="API port (default %(default)s)")
    p.add_argument("--tls-cert", help="serve the API over HTTPS with this certificate (see `fleetvisor ca`)")
    p.add_argument("--tls-key", help="the key of --tls-cert")
    p.add_argument(
        "--auth",
        action="store_true",
        help="require API tokens; the first start writes an admin token next to the store (admin.token)",
    )
    edge.add_arguments(p)
    retention_flags.add_arguments(p)
    _add_host_arguments(p)
    p.add_argument(
        "--ha-fencing",
        choices=("none", "process", "lease", "bmc"),
        default=ha.fencing,
        help="how a failed host is fenced before its HA VMs restart: none (alert only, the default), "
        "process (kill its processes; hosts on this machine), lease (agents run with --ha-lease), "
        "bmc (IPMI power-off confirmed by the BMC; needs --bmc-config)",
    )
    p.add_argument(
        "--bmc-config",
        help="JSON/YAML: {host: {address, port, username, password_file}} for BMC fencing and power control",
    )
    p.add_argument(
        "--wol-config",
        help="JSON/YAML: {host: {mac, broadcast, port, interface}}: Wake-on-LAN, tried after the BMC to power on",
    )
    _add_power_arguments(p)
    for flag, default, metavar, text in (
        ("--ha-suspect-phi", det.suspect_phi, "PHI", "heartbeat suspicion to mark a host suspect"),
        ("--ha-fail-phi", det.fail_phi, "PHI",
         "heartbeat suspicion to mark a host failed (higher: fewer false alarms, slower detection)"),
        ("--ha-will-confirm", det.will_confirm_s, "S",
         "after a Last Will, how long a host must stay away before it is failed"),
        ("--operation-timeout", fs.operation_timeout_s, "S",
         "an operation without a reply fails after this long and releases its claim"),
        ("--ha-lease", ha.lease_s, "S", "HA lease; must match the agents'"),
    ):  # fmt: skip
        p.add_argument(
            flag, type=float, default=default, metavar=metavar, help=f"{text} (default %(default)s)"
        )
    p.add_argument(
        "--ha-tolerate",
        type=int,
        default=ha.host_failures_to_tolerate,
        metavar="N",
        help="admission control: refuse placements that leave no room to restart HA VMs after N host failures",
    )
    p.add_argument(
        "--fence-dir", help="process fencing: the directory that holds each host's state directory"
    )


def _add_host_arguments(p: argparse.ArgumentParser) -> None:
    """How hosts join: the enrolment flags of ``fleetvisor controller``."""
    p.add_argument(
        "--enrolment",
        choices=("operator", "open"),
        default=HostSettings().enrolment,
        help="how new host ids join: operator (pending until `fleetvisor host accept`, or a one-time join "
        "token; the default) or open (any host that reaches the bus joins)",
    )
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=HostSettings().capacity_factor,
        metavar="X",
        help="an enrolled host whose cores or memory change by more than this factor is pending again "
        "(default %(default)s)",
    )


def _add_power_arguments(p: argparse.ArgumentParser) -> None:
    """The power manager's flags of ``fleetvisor controller``."""
    ps = PowerSettings()
    p.add_argument(
        "--power-mode",
        choices=("manual", "recommend", "auto"),
        default=None,
        help="power manager automation level: manual (plan only when asked), recommend (plan every interval "
        "and publish it), auto (consolidate, power hosts off and on by itself). Default: the level last set "
        "with `fleetvisor power mode`, else manual; a level given here replaces that one",
    )
    p.add_argument(
        "--power-interval",
        type=float,
        default=ps.interval_s,
        metavar="S",
        help="seconds between power manager rounds",
    )
    p.add_argument(
        "--spare-hosts",
        type=int,
        default=ps.spare_hosts,
        metavar="N",
        help="empty hosts kept powered on (default %(default)s)",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=ps.headroom,
        metavar="SHARE",
        help="share of powered-on CPU and memory kept free for the forecast demand (default %(default)s)",
    )
    p.add_argument(
        "--idle-rounds",
        type=int,
        default=ps.idle_rounds,
        metavar="N",
        help="rounds a host must stay empty before it may go to standby (default %(default)s)",
    )
    p.add_argument(
        "--power-cooldown",
        type=float,
        default=ps.cooldown_s,
        metavar="S",
        help="the power manager moves no VM within this many seconds of its last migration (default %(default)s)",
    )


def controller_settings(
    args: argparse.Namespace, *, password: str | None, bus_overrides: dict[str, Any]
) -> ControllerSettings:
    """The settings ``fleetvisor controller`` runs with, from the flags of :func:`add_arguments`.

    Raises:
        ValueError: a power setting is out of range, or a BMC or Wake-on-LAN file is wrong.
    """
    bmcs = load_bmc_config(pathlib.Path(args.bmc_config)) if args.bmc_config else {}
    power = PowerSettings(
        mode=args.power_mode,
        interval_s=args.power_interval,
        spare_hosts=args.spare_hosts,
        headroom=args.headroom,
        idle_rounds=args.idle_rounds,
        cooldown_s=args.power_cooldown,
        bmcs=bmcs,
        wol=load_wol_config(pathlib.Path(args.wol_config)) if args.wol_config else {},
    )
    problems = power.problems()
    if not args.capacity_factor > 1:
        problems.append(f"--capacity-factor {args.capacity_factor:g}: must be more than 1 (e.g. 2)")
    if problems:
        raise ValueError("; ".join(problems))
    ha = HaSettings(
        detector=DetectorSettings(
            suspect_phi=args.ha_suspect_phi, fail_phi=args.ha_fail_phi, will_confirm_s=args.ha_will_confirm
        ),
        fencing=args.ha_fencing,
        lease_s=args.ha_lease,
        fence_dir=pathlib.Path(args.fence_dir) if args.fence_dir else None,
        bmcs=bmcs,
        host_failures_to_tolerate=args.ha_tolerate,
    )
    settings = ControllerSettings(
        username=args.username,
        password=password,
        broker_url=args.broker,
        embedded_broker=args.embedded_broker,
        embedded_broker_port=args.broker_port,
        db_path=pathlib.Path(args.db),
        api_host=args.listen,
        api_port=args.port,
        auth=args.auth,
        tls_cert=pathlib.Path(args.tls_cert) if args.tls_cert else None,
        tls_key=pathlib.Path(args.tls_key) if args.tls_key else None,
        edge=edge.options_of(args),
        retention=retention_flags.settings_of(args),
        bus_overrides=bus_overrides,
        fleet=FleetSettings(
            operation_timeout_s=args.operation_timeout,
            ha=ha,
            hosts=HostSettings(enrolment=args.enrolment, capacity_factor=args.capacity_factor),
            power=power,
        ),
    )
    if settings.serve_api:
        edge.check_exposure(settings.api_host, settings.auth, settings.edge)
    return settings
