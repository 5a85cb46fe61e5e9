"""The ``fleetvisor`` command: the composition root, and the only module that imports across layers.

``controller`` and ``agent`` start the daemons; ``demo`` runs a whole fleet in one process on the
embedded broker and the sim engine; ``vm``, ``host``, ``op`` and ``events`` are the operator's
commands, which talk to a controller over its REST API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pathlib
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from agent.daemon import Agent, AgentSettings, default_state_dir
from controller import broker_config, pki
from controller import cli as operator_cli
from controller.daemon import Controller, ControllerSettings, default_db_path
from controller.embedded_broker import EmbeddedBroker
from controller.errors import ApiError
from controller.failure_detector import DetectorSettings
from controller.fencing import load_bmc_config
from controller.fleet import FleetSettings
from controller.ha import HaSettings
from controller.power import load_wol_config
from controller.services.power import PowerSettings
from hv.driver import HvError
from hv.engines import ENGINES, UnknownEngine, create_driver
from protocols.bus import BrokerAddress, BusError, read_secret
from protocols.vmspec import HOST_ID_RE, BootSpec, VmSpec, VmWorkload

log = logging.getLogger("fleetvisor")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("amqtt", "transitions", "httpx", "uvicorn", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run a daemon on uvloop; SIGTERM and SIGINT set the stop event instead of raising."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    try:
        import uvloop

        return uvloop.run(runner())
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        return asyncio.run(runner())


# -- controller -----------------------------------------------------------------------------------


def _password(args: argparse.Namespace) -> str | None:
    return read_secret(args.password_file) if args.password_file else None


def _bus_tls(args: argparse.Namespace) -> dict[str, object]:
    """Bus settings for mqtts:// verified against --ca-file (the system CAs without it)."""
    if not args.ca_file:
        return {}
    try:
        return {"tls_context": ssl.create_default_context(cafile=args.ca_file)}
    except (OSError, ssl.SSLError) as exc:
        raise BusError(f"cannot load the CA certificate {args.ca_file!r}: {exc}") from None


def cmd_controller(args: argparse.Namespace) -> int:
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
    if problems:
        raise ValueError("; ".join(problems))
    settings = ControllerSettings(
        username=args.username,
        password=_password(args),
        broker_url=args.broker,
        embedded_broker=args.embedded_broker,
        embedded_broker_port=args.broker_port,
        db_path=pathlib.Path(args.db),
        api_host=args.listen,
        api_port=args.port,
        auth=args.auth,
        tls_cert=pathlib.Path(args.tls_cert) if args.tls_cert else None,
        tls_key=pathlib.Path(args.tls_key) if args.tls_key else None,
        bus_overrides=_bus_tls(args),
        fleet=FleetSettings(
            operation_timeout_s=args.operation_timeout,
            ha=HaSettings(
                detector=DetectorSettings(
                    suspect_phi=args.ha_suspect_phi,
                    fail_phi=args.ha_fail_phi,
                    will_confirm_s=args.ha_will_confirm,
                ),
                fencing=args.ha_fencing,
                lease_s=args.ha_lease,
                fence_dir=pathlib.Path(args.fence_dir) if args.fence_dir else None,
                bmcs=bmcs,
                host_failures_to_tolerate=args.ha_tolerate,
            ),
            power=power,
        ),
    )

    async def main(stop: asyncio.Event) -> int:
        async with Controller(settings) as controller:
            print(f"controller: API {controller.api_url}/api/v1, store {settings.db_path}", flush=True)
            await stop.wait()
        return 0

    return _run(main)


# -- agent ----------------------------------------------------------------------------------------


def cmd_agent(args: argparse.Namespace) -> int:
    if not HOST_ID_RE.fullmatch(args.host_id):
        print(
            f"fleetvisor agent: host id {args.host_id!r} is invalid; use letters, digits, '.', '_' and '-'",
            file=sys.stderr,
        )
        return 2
    state_dir = pathlib.Path(args.state_dir) if args.state_dir else default_state_dir(args.host_id)
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(
                f"fleetvisor agent: --label {item!r}: write it as KEY=VALUE, e.g. --label zone=a",
                file=sys.stderr,
            )
            return 2
        labels[key] = value
    options: dict[str, object] = {}
    if args.hv == "sim":
        options = {"cores": args.cores, "memory_mib": args.memory_mib}
    elif args.hv == "qemu":
        options = {"accel": args.accel}
        if args.image_dir:
            options["image_dirs"] = [pathlib.Path(d) for d in args.image_dir]
    if args.power_idle_w is not None:
        options["power_idle_w"] = args.power_idle_w
    if args.power_max_w is not None:
        options["power_max_w"] = args.power_max_w
    try:
        driver = create_driver(args.hv, host_id=args.host_id, state_dir=state_dir, **options)
    except (UnknownEngine, ValueError) as exc:
        print(f"fleetvisor agent: {exc}", file=sys.stderr)
        return 2
    settings = AgentSettings(
        host_id=args.host_id,
        broker_url=args.broker,
        username=args.username,
        password=_password(args),
        state_dir=state_dir,
        telemetry_interval_s=args.telemetry_interval,
        address=args.address,
        ha_lease_s=args.ha_lease if args.ha_lease > 0 else None,
        labels=labels,
        bus_overrides=_bus_tls(args),
    )

    async def main(stop: asyncio.Event) -> int:
        try:
            async with Agent(settings, driver):
                await stop.wait()
        except HvError as exc:
            print(f"fleetvisor agent: the {args.hv} engine cannot start: {exc}", file=sys.stderr)
            return 1
        return 0

    return _run(main)


# -- demo -----------------------------------------------------------------------------------------

DEMO_SIZES = [(1, 512), (2, 1024), (2, 2048), (4, 4096)]


async def run_demo(args: argparse.Namespace, stop: asyncio.Event) -> int:
    state_root = (
        pathlib.Path(args.state_dir)
        if args.state_dir
        else pathlib.Path(tempfile.mkdtemp(prefix="fleetvisor-demo-"))
    )
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"demo [{time.monotonic() - t0:5.1f}s] {text}", flush=True)

    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(EmbeddedBroker("127.0.0.1", args.broker_port))
        say(f"embedded MQTT broker (amqtt) on {broker.url}")
        controller = await stack.enter_async_context(
            Controller(
                ControllerSettings(
                    broker_url=broker.url,
                    db_path=state_root / "controller.sqlite",
                    api_port=args.port,
                )
            )
        )
        assert controller.service is not None
        service = controller.service
        say(f"controller up, store {state_root / 'controller.sqlite'}, API {controller.api_url}/api/v1")
        images = state_root / "images"
        kernel: pathlib.Path | None = None
        if args.hv == "qemu":
            kernel = _demo_guest(images)
            say(f"tiny guest {kernel} (built by scripts/build-guests)")
        for i in range(1, args.hosts + 1):
            host_id = f"host-{i}"
            options: dict[str, object] = {"image_dirs": [images]} if args.hv == "qemu" else {}
            driver = create_driver(args.hv, host_id=host_id, state_dir=state_root / host_id, **options)
            await stack.enter_async_context(
                Agent(
                    AgentSettings(host_id=host_id, broker_url=broker.url, state_dir=state_root / host_id),
                    driver,
                )
            )
        deadline = time.monotonic() + 15
        while service.online_host_count() < args.hosts and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # hosts join through the store; a short poll is simplest here
        say(
            f"{service.online_host_count()} {args.hv} agents joined: "
            + ", ".join(h.host_id for h in service.store.hosts())
        )
        ops = []
        for i in range(args.vms):
            vcpus, memory = DEMO_SIZES[i % len(DEMO_SIZES)]
            spec = VmSpec(
                name=f"vm-{i + 1:02d}",
                vcpus=vcpus,
                memory_mib=memory,
                workload=VmWorkload(cpu_util=0.1 + 0.07 * (i % 10), dirty_mib_s=2.0 + i),
            )
            if kernel is not None:  # a real guest: the tiny one, small and quick to boot under TCG
                spec = VmSpec(
                    name=spec.name,
                    memory_mib=64,
                    boot=BootSpec(kernel=str(kernel), cmdline="dirty_mib_s=1"),
                    console=False,
                    rng=False,
                    balloon=False,
                )
            try:
                record, op, _ = service.create_vm(spec)
            except ApiError as exc:
                say(f"create {spec.name} refused: {exc.message}")
                continue
            ops.append(op.op_id)
            say(f"create {spec.name} ({vcpus} vCPU, {memory} MiB) -> {record.host_id}")
        results = await asyncio.gather(*(service.wait_operation(op_id, 30) for op_id in ops))
        failed = [op for op in results if op.state != "succeeded"]
        say(
            f"{len(results) - len(failed)} of {len(results)} creates succeeded"
            + (f"; failed: {[f.error for f in failed]}" if failed else "")
        )
        print(
            "\nLook around while the demo runs:\n"
            f"  fleetvisor host list --url {controller.api_url}\n"
            f"  fleetvisor vm list --url {controller.api_url}\n"
            f"  fleetvisor events --follow --url {controller.api_url}\n"
            f"  curl -N {controller.api_url}/api/v1/events/stream\n"
            f"  {controller.api_url}/api/v1/docs (OpenAPI: {controller.api_url}/api/v1/openapi.json)\n",
            flush=True,
        )
        if args.for_seconds is not None:
            say(f"running for {args.for_seconds:g}s (Ctrl-C stops sooner)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.for_seconds)
        else:
            say("running until Ctrl-C")
            await stop.wait()
        hosts, running = service.online_host_count(), service.running_vm_count()
        engine = args.hv
        if args.hv == "qemu":
            accels = sorted({h.capabilities.accel for h in service.store.hosts()})
            engine = f"qemu/{'+'.join(accels) or '?'}"
        say(f"telemetry: {service.telemetry_count} samples ingested; shutting down")
        if args.hv == "qemu":  # real guests outlive their agents by design; the demo cleans up after itself
            deletes = [service.delete_vm(vm.name).op_id for vm in service.store.vms() if vm.op_id is None]
            done = await asyncio.gather(*(service.wait_operation(op_id, 30) for op_id in deletes))
            say(f"deleted {sum(op.state == 'succeeded' for op in done)} of {len(done)} guests")
    print(f"demo: {hosts} hosts, {running} VMs running ({engine})", flush=True)
    return 0


def _demo_guest(images: pathlib.Path) -> pathlib.Path:
    """Copy the tiny test guest into the demo's image directory (the engine reads nothing outside it).

    Raises:
        OSError: the guest has not been built; the message says how to build it.
    """
    built = pathlib.Path(__file__).resolve().parent / ".cache" / "guests" / "tiny.elf"
    if not built.exists():
        raise OSError(
            f"the tiny guest {built} is missing; build it with ./scripts/build-guests (./scripts/demo does)"
        )
    images.mkdir(parents=True, exist_ok=True)
    target = images / "tiny.elf"
    shutil.copyfile(built, target)
    return target


def cmd_demo(args: argparse.Namespace) -> int:
    if args.hv == "qemu":  # two real hosts with a couple of tiny guests each, unless told otherwise
        args.hosts = args.hosts or 2
        args.vms = args.vms or 4
    args.hosts = args.hosts or 4
    args.vms = args.vms or 12
    return _run(lambda stop: run_demo(args, stop))


# -- trace-driven simulation ---------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from controller.balancer import evaluation

    try:
        metrics = evaluation.run(args.trace, args.policy, plot_path=args.plot)
    except (evaluation.TraceError, evaluation.UnknownPolicyError) as exc:
        print(f"fleetvisor simulate: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"fleetvisor simulate: --plot: {exc}", file=sys.stderr)
        return 2
    print(evaluation.format_summary(metrics))
    if args.plot:
        print(f"plot: {args.plot}")
    print(evaluation.format_metrics(metrics))
    return 0


# -- broker configuration -------------------------------------------------------------------------


def cmd_broker_config(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        config = broker_config.generate(
            hosts,
            pathlib.Path(args.out),
            listen=args.listen,
            port=args.port,
            persistence=not args.no_persistence,
        )
    except broker_config.BrokerConfigError as exc:
        print(f"fleetvisor broker-config: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {config.conf}, {config.passwd}, {config.acl}")
    print(f"start the broker:  mosquitto -c {config.conf}")
    for user, path in config.credentials.items():
        role = "controller" if user == broker_config.CONTROLLER_USER else "agent"
        print(f"  {role:10} --username {user} --password-file {path}")
    return 0


def _add_credentials(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--username", help="broker user (see `fleetvisor broker-config`)")
    parser.add_argument("--password-file", help="file whose first line is the broker password")
    parser.add_argument("--ca-file", help="CA certificate that signs the broker's (for mqtts:// URLs)")


def cmd_ca(args: argparse.Namespace) -> int:
    directory = pathlib.Path(args.dir)
    try:
        if args.action == "init":
            print(f"CA certificate: {pki.init_ca(directory)}")
        else:
            cert, key = pki.issue(directory, args.name, ips=args.ip, dns=args.dns)
            print(f"certificate: {cert}\nkey:         {key}")
    except pki.PkiError as exc:
        print(f"fleetvisor ca: {exc}", file=sys.stderr)
        return 2
    return 0


# -- parser ---------------------------------------------------------------------------------------


def _broker_url(value: str) -> str:
    try:
        BrokerAddress.parse(value)
    except BusError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetvisor", description="Fleet manager for virtual machines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("controller", help="run the controller (store, scheduler, API)")
    p.add_argument("--broker", type=_broker_url, default="mqtt://127.0.0.1:1883", help="MQTT broker URL")
    p.add_argument(
        "--embedded-broker", action="store_true", help="run an embedded MQTT broker (amqtt) in-process"
    )
    p.add_argument("--broker-port", type=int, default=1883, help="port of the embedded broker (default 1883)")
    p.add_argument("--db", default=str(default_db_path()), help="SQLite state store (default %(default)s)")
    p.add_argument("--listen", default="127.0.0.1", help="API address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="API port (default 8080)")
    p.add_argument("--tls-cert", help="serve the API over HTTPS with this certificate (see `fleetvisor ca`)")
    p.add_argument("--tls-key", help="the key of --tls-cert")
    p.add_argument(
        "--auth",
        action="store_true",
        help="require API tokens; the first start writes an admin token next to the store (admin.token)",
    )
    p.add_argument(
        "--ha-fencing",
        choices=("none", "process", "lease", "bmc"),
        default="none",
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
    p.add_argument(
        "--power-mode",
        choices=("manual", "recommend", "auto"),
        default=None,
        help="power manager automation level: manual (plan only when asked), recommend (plan every interval "
        "and publish it), auto (consolidate, power hosts off and on by itself). Default: the level last set "
        "with `fleetvisor power mode`, else manual; a level given here replaces that one",
    )
    p.add_argument(
        "--power-interval", type=float, default=30.0, metavar="S", help="seconds between power manager rounds"
    )
    p.add_argument(
        "--spare-hosts", type=int, default=1, metavar="N", help="empty hosts kept powered on (default 1)"
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=0.2,
        metavar="SHARE",
        help="share of powered-on CPU and memory kept free for the forecast demand (default 0.2)",
    )
    p.add_argument(
        "--idle-rounds",
        type=int,
        default=3,
        metavar="N",
        help="rounds a host must stay empty before it may go to standby (default 3)",
    )
    p.add_argument(
        "--power-cooldown",
        type=float,
        default=600.0,
        metavar="S",
        help="the power manager moves no VM within this many seconds of its last migration (default 600)",
    )
    p.add_argument(
        "--ha-suspect-phi",
        type=float,
        default=5.0,
        metavar="PHI",
        help="heartbeat suspicion to mark a host suspect",
    )
    p.add_argument(
        "--ha-fail-phi",
        type=float,
        default=10.0,
        metavar="PHI",
        help="heartbeat suspicion to mark a host failed (higher: fewer false alarms, slower detection)",
    )
    p.add_argument(
        "--ha-will-confirm",
        type=float,
        default=1.0,
        metavar="S",
        help="after a Last Will, how long a host must stay away before it is failed",
    )
    p.add_argument(
        "--ha-tolerate",
        type=int,
        default=0,
        metavar="N",
        help="admission control: refuse placements that leave no room to restart HA VMs after N host failures",
    )
    p.add_argument(
        "--operation-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="an operation without a reply fails after this long and releases its claim (default 60)",
    )
    p.add_argument(
        "--fence-dir", help="process fencing: the directory that holds each host's state directory"
    )
    p.add_argument(
        "--ha-lease", type=float, default=3.0, metavar="S", help="HA lease; must match the agents'"
    )
    _add_credentials(p)
    p.set_defaults(func=cmd_controller)

    p = sub.add_parser("agent", help="run a host agent")
    p.add_argument("--host-id", required=True, help="this host's id (unique in the fleet)")
    p.add_argument("--broker", type=_broker_url, default="mqtt://127.0.0.1:1883", help="MQTT broker URL")
    p.add_argument("--hv", choices=ENGINES, default="sim", help="hypervisor engine (default sim)")
    p.add_argument(
        "--state-dir", help="where the agent keeps its state (default ~/.local/state/fleetvisor/agent/ID)"
    )
    p.add_argument(
        "--telemetry-interval", type=float, default=1.0, metavar="S", help="seconds between samples"
    )
    p.add_argument("--address", default="127.0.0.1", help="address other hosts reach this one on")
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label this host reports"
    )
    p.add_argument(
        "--image-dir",
        action="append",
        metavar="DIR",
        help="qemu engine: a directory VMs may take kernels and disk images from (repeatable; default STATE/images)",
    )
    p.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default="auto",
        help="qemu engine: KVM when a probe shows it really runs guests (auto), or force one",
    )
    p.add_argument("--power-idle-w", type=float, help="the host's power model: watts at idle")
    p.add_argument("--power-max-w", type=float, help="the host's power model: watts at full load")
    p.add_argument("--cores", type=int, default=16, help="sim engine: cores of the simulated host")
    p.add_argument("--memory-mib", type=int, default=65536, help="sim engine: memory of the simulated host")
    p.add_argument(
        "--ha-lease",
        type=float,
        default=0.0,
        metavar="S",
        help="opt-in self-fencing: destroy HA VMs after this long without the bus; 0 disables (the default)",
    )
    _add_credentials(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "simulate", help="replay a PlanetLab trace day through a consolidation policy (800 sim hosts)"
    )
    p.add_argument("--trace", required=True, help="a day of ../shared/data/planetlab/*.csv.gz")
    p.add_argument(
        "--policy",
        default="fleetvisor",
        help="fleetvisor (default), thr-mmt (THR-MMT-0.8), mad-mmt (MAD-MMT-2.5) or lr-mmt (LR-MMT-1.2)",
    )
    p.add_argument("--plot", help="write active hosts, power and SLA violations over the day to this PNG")
    p.set_defaults(func=cmd_simulate)

    ca = sub.add_parser("ca", help="a small CA for TLS on the bus and the API").add_subparsers(
        dest="action", required=True
    )
    p = ca.add_parser("init", help="create a CA (ca.key, ca.crt)")
    p.add_argument("--dir", default="deploy/pki", help="where the CA lives (default deploy/pki)")
    p.set_defaults(func=cmd_ca)
    p = ca.add_parser("issue", help="issue a certificate signed by the CA")
    p.add_argument("name", help="file name and common name, e.g. broker, controller, h1")
    p.add_argument("--dir", default="deploy/pki")
    p.add_argument("--ip", action="append", default=[], help="IP subject alternative name (repeatable)")
    p.add_argument("--dns", action="append", default=[], help="DNS subject alternative name (repeatable)")
    p.set_defaults(func=cmd_ca)

    p = sub.add_parser("broker-config", help="write a Mosquitto config with per-host credentials and ACLs")
    p.add_argument("--hosts", required=True, help="comma-separated host ids, e.g. h1,h2,h3")
    p.add_argument("--out", default="deploy/broker", help="output directory (default deploy/broker)")
    p.add_argument("--listen", default="0.0.0.0", help="listener address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=1883, help="listener port (default 1883)")
    p.add_argument("--no-persistence", action="store_true", help="do not persist sessions to disk")
    p.set_defaults(func=cmd_broker_config)

    p = sub.add_parser("demo", help="run a whole fleet in one process: broker, controller, sim agents, VMs")
    p.add_argument("--port", type=int, default=8080, help="API port (default 8080)")
    p.add_argument("--broker-port", type=int, default=0, help="embedded broker port (default: a free one)")
    p.add_argument("--hosts", type=int, default=0, help="agents to run (default 4 for sim, 2 for qemu)")
    p.add_argument("--vms", type=int, default=0, help="VMs to create (default 12 for sim, 4 for qemu)")
    p.add_argument("--hv", choices=ENGINES, default="sim")
    p.add_argument(
        "--for", dest="for_seconds", type=float, default=None, metavar="SECONDS", help="exit after this long"
    )
    p.add_argument("--state-dir", help="keep the demo's state here (default: a new temporary directory)")
    p.set_defaults(func=cmd_demo)

    operator_cli.add_operator_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.command == "demo" and not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # the demo narrates; logs only for trouble
    if args.command in operator_cli.OPERATOR_COMMANDS:
        logging.getLogger().setLevel(logging.WARNING)
        return operator_cli.run_operator_command(args)
    try:
        return int(args.func(args))
    except (OSError, BusError, ValueError) as exc:
        print(f"fleetvisor {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
