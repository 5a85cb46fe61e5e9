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
import os
import pathlib
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

from controller import cli as operator_cli
from controller.cli import completion

if TYPE_CHECKING:  # the daemons' modules are imported by the commands that run them, so that
    # an operator command (`fleetvisor vm list`) starts without loading the server
    from controller.broker import acl_config as broker_config
    from controller.daemon import Controller


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
    from protocols.bus import read_secret

    return read_secret(args.password_file) if args.password_file else None


def _bus_tls(args: argparse.Namespace) -> dict[str, object]:
    """Bus settings for mqtts:// verified against --ca-file (the system CAs without it)."""
    from protocols.bus import BusError

    if not args.ca_file:
        return {}
    try:
        return {"tls_context": ssl.create_default_context(cafile=args.ca_file)}
    except (OSError, ssl.SSLError) as exc:
        raise BusError(f"cannot load the CA certificate {args.ca_file!r}: {exc}") from None


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.daemon import Controller, controller_settings

    settings = controller_settings(args, password=_password(args), bus_overrides=_bus_tls(args))

    async def main(stop: asyncio.Event) -> int:
        async with Controller(settings) as controller:
            print(f"controller: API {controller.api_url}/api/v1, store {settings.db_path}", flush=True)
            await stop.wait()
        return 0

    return _run(main)


# -- agent ----------------------------------------------------------------------------------------


def cmd_agent(args: argparse.Namespace) -> int:
    from agent import cli as agent_cli
    from agent.daemon import Agent, default_state_dir
    from hv.driver import HvError
    from protocols.tasks import cancel_and_wait

    state_dir = pathlib.Path(args.state_dir) if args.state_dir else default_state_dir(args.host_id)
    try:
        settings, driver = agent_cli.build(
            args, password=_password(args), bus_overrides=_bus_tls(args), state_dir=state_dir
        )
    except ValueError as exc:
        print(f"fleetvisor agent: {exc}", file=sys.stderr)
        return 2

    async def main(stop: asyncio.Event) -> int:
        try:
            async with Agent(settings, driver) as agent:
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(agent.stopped.wait())]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                await cancel_and_wait(waits)
        except HvError as exc:
            print(f"fleetvisor agent: the {args.hv} engine cannot start: {exc}", file=sys.stderr)
            return 1
        if agent.refused is not None:
            print(f"fleetvisor agent: host {args.host_id}: {agent.refused}", file=sys.stderr)
            return 3
        return 0

    return _run(main)


# -- demo -----------------------------------------------------------------------------------------

DEMO_SIZES = [(1, 512), (2, 1024), (2, 2048), (4, 4096)]


Say = Callable[[str], None]


async def run_demo(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """The demo: an embedded broker, a controller, agents and VMs in this process, until stopped."""
    from agent.daemon import Agent, AgentSettings
    from controller.broker.embedded import EmbeddedBroker
    from controller.daemon import Controller, ControllerSettings
    from hv.engines import create_driver

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
                    broker_url=broker.url, db_path=state_root / "controller.sqlite", api_port=args.port
                )
            )
        )
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
            token = controller.hosts.enrolment.create_token(host_id, 600).token
            settings = AgentSettings(
                host_id=host_id, broker_url=broker.url, state_dir=state_root / host_id, join_token=token
            )
            await stack.enter_async_context(Agent(settings, driver))
            say(f"{host_id} joins with a one-time join token (`fleetvisor host join-token --host {host_id}`)")
        await _demo_vms(controller, args, kernel, say)
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
        summary = await _demo_end(controller, args, say)
    print(summary, flush=True)
    return 0


async def _demo_vms(
    controller: Controller, args: argparse.Namespace, kernel: pathlib.Path | None, say: Say
) -> None:
    """Wait for the demo's agents, then create its VMs and wait for the creates."""
    from controller.common.errors import DomainError
    from protocols.vmspec import BootSpec, VmSpec, VmWorkload

    deadline = time.monotonic() + 15
    while controller.hosts.online_count() < args.hosts and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # hosts join through the store; a short poll is simplest here
    say(
        f"{controller.hosts.online_count()} {args.hv} agents joined: "
        + ", ".join(h.host_id for h in controller.store.hosts())
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
            record, op, _ = controller.vms.create(spec)
        except DomainError as exc:
            say(f"create {spec.name} refused: {exc.message}")
            continue
        ops.append(op.op_id)
        say(f"create {spec.name} ({vcpus} vCPU, {memory} MiB) -> {record.host_id}")
    results = await asyncio.gather(*(controller.operations.wait(op_id, 30) for op_id in ops))
    failed = [op for op in results if op.state != "succeeded"]
    say(
        f"{len(results) - len(failed)} of {len(results)} creates succeeded"
        + (f"; failed: {[f.error for f in failed]}" if failed else "")
    )


async def _demo_end(controller: Controller, args: argparse.Namespace, say: Say) -> str:
    """Count what runs, delete real guests (they outlive their agents by design), and return the summary."""
    hosts, running = controller.hosts.online_count(), controller.vms.running_count()
    engine = args.hv
    if args.hv == "qemu":
        accels = sorted({h.capabilities.accel for h in controller.store.hosts()})
        engine = f"qemu/{'+'.join(accels) or '?'}"
    say(f"telemetry: {controller.live.telemetry_count} samples ingested; shutting down")
    if args.hv == "qemu":
        deletes = [controller.vms.delete(vm.name).op_id for vm in controller.store.vms() if vm.op_id is None]
        done = await asyncio.gather(*(controller.operations.wait(op_id, 30) for op_id in deletes))
        say(f"deleted {sum(op.state == 'succeeded' for op in done)} of {len(done)} guests")
    return f"demo: {hosts} hosts, {running} VMs running ({engine})"


def _demo_guest(images: pathlib.Path) -> pathlib.Path:
    """Copy the tiny test guest into the demo's image directory (the engine reads nothing outside it).

    Raises:
        OSError: the guest has not been built; the message says how to build it.
    """
    guests = os.environ.get("FV_GUEST_DIR") or str(
        pathlib.Path(__file__).resolve().parent / ".cache" / "guests"
    )
    built = pathlib.Path(guests) / "tiny.elf"
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


def _broker_certificate(args: argparse.Namespace) -> broker_config.TlsFiles:
    """The broker's certificate from the CA in --pki: issued on the first run, reused after."""
    from controller.broker import acl_config as broker_config
    from controller.security import pki

    pki_dir = pathlib.Path(args.pki)
    cert, key = pki_dir / "broker.crt", pki_dir / "broker.key"
    if not (cert.exists() and key.exists()):
        dns = args.tls_dns or sorted({"localhost", socket.gethostname(), socket.getfqdn()})
        cert, key = pki.issue(pki_dir, "broker", ips=args.tls_ip or ["127.0.0.1"], dns=dns)
    return broker_config.TlsFiles(ca=pki_dir / "ca.crt", cert=cert, key=key)


def cmd_broker_config(args: argparse.Namespace) -> int:
    from controller.broker import acl_config as broker_config
    from controller.security import pki

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        tls = None if args.no_tls else _broker_certificate(args)
        plugin = pathlib.Path(args.dynsec_plugin) if args.dynsec_plugin else None
        ports = {"listen": args.listen, "port": args.port, "plain_port": args.plain_port}
        config = broker_config.generate(
            hosts,
            pathlib.Path(args.out),
            tls=tls,
            persistence=not args.no_persistence,
            plugin=plugin,
            **ports,
        )
    except (broker_config.BrokerConfigError, pki.PkiError) as exc:
        print(f"fleetvisor broker-config: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {config.conf} and {config.security}")
    print(f"start the broker:  mosquitto -c {config.conf}")
    local = f"--broker mqtt://127.0.0.1:{args.plain_port}"
    host = (args.tls_dns or [socket.getfqdn()])[0]
    remote = f"--broker mqtts://{host}:{args.port} --ca-file {config.ca}" if config.ca else local
    for user, path in config.credentials.items():
        role, url = ("controller", local) if user == broker_config.CONTROLLER_USER else ("agent", remote)
        print(f"  {role:10} {url} --username {user} --password-file {path}")
    return 0


def _add_credentials(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--username", help="broker user (see `fleetvisor broker-config`)")
    parser.add_argument("--password-file", help="file whose first line is the broker password")
    parser.add_argument("--ca-file", help="CA certificate that signs the broker's (for mqtts:// URLs)")


def cmd_ca(args: argparse.Namespace) -> int:
    from controller.security import pki

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
    from protocols.bus import BrokerAddress, BusError

    try:
        BrokerAddress.parse(value)
    except BusError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion.script(build_parser(), args.shell), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole ``fleetvisor`` command line: daemons, tools and the operator commands."""
    parser = argparse.ArgumentParser(prog="fleetvisor", description="Fleet manager for virtual machines.")
    operator_cli.add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_controller_parser(sub)
    _add_agent_parser(sub)
    _add_tool_parsers(sub)
    _add_store_parser(sub)
    operator_cli.add_operator_commands(sub)
    return parser


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_controller_parser(sub: Subparsers) -> None:
    """``fleetvisor controller``; the controller knows its own flags (controller.daemon.add_arguments)."""
    from controller.daemon import add_arguments as add_controller_arguments

    p = sub.add_parser("controller", help="run the controller (store, scheduler, API)")
    add_controller_arguments(p, broker_url=_broker_url)
    _add_credentials(p)
    p.set_defaults(func=cmd_controller)


def _add_agent_parser(sub: Subparsers) -> None:
    """``fleetvisor agent``; the agent knows its own flags (agent.cli.add_arguments)."""
    from agent import cli as agent_cli
    from controller.daemon import ControllerSettings

    p = sub.add_parser("agent", help="run a host agent")
    agent_cli.add_arguments(p, broker_url=_broker_url, default_broker=ControllerSettings().broker_url)
    _add_credentials(p)
    p.set_defaults(func=cmd_agent)


def cmd_store(args: argparse.Namespace) -> int:
    """``store backup FILE`` (online, consistent) and ``store restore FILE`` (controller stopped)."""
    from controller.state import files as store_files

    if args.action == "backup":
        counts = store_files.backup(args.db, args.file)
        print(f"backed up {args.db} to {args.file} (mode 0600): {_counted(counts)}")
    else:
        counts = store_files.restore(args.file, args.db)
        print(f"restored {args.file} into {args.db}: {_counted(counts)}; start the controller on it")
    return 0


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {table}" for table, n in counts.items() if table != "schema_version") + (
        f" (schema {counts.get('schema_version', 0)})"
    )


def _add_store_parser(sub: Subparsers) -> None:
    """``fleetvisor store backup|restore``."""
    from controller.daemon import default_db_path

    store = sub.add_parser("store", help="back up or restore the controller's state store").add_subparsers(
        dest="action", required=True
    )
    p = store.add_parser("backup", help="a consistent copy of the store, taken while the controller runs")
    p.add_argument("file", help="where to write the backup (mode 0600)")
    p.add_argument(
        "--db", default=str(default_db_path()), help="the controller's store (default %(default)s)"
    )
    p.set_defaults(func=cmd_store)
    p = store.add_parser("restore", help="put a backup in place of the store (stop the controller first)")
    p.add_argument("file", help="the backup to restore")
    p.add_argument(
        "--db", default=str(default_db_path()), help="the controller's store (default %(default)s)"
    )
    p.set_defaults(func=cmd_store)


def _add_tool_parsers(sub: Subparsers) -> None:
    """``simulate``, ``ca``, ``broker-config``, ``completion`` and ``demo``."""
    from controller.broker import acl_config as broker_config
    from controller.daemon import ControllerSettings
    from hv.engines import ENGINES

    p = sub.add_parser(
        "completion", help="print a bash or zsh completion script: source <(fleetvisor completion bash)"
    )
    p.add_argument("shell", choices=("bash", "zsh"))
    p.set_defaults(func=cmd_completion)
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
    p = sub.add_parser("broker-config", help="a Mosquitto config: per-host users, client ids, ACLs, TLS")
    p.add_argument("--hosts", required=True, help="comma-separated host ids, e.g. h1,h2,h3")
    p.add_argument("--out", default="deploy/broker", help="output directory (default deploy/broker)")
    p.add_argument("--listen", default="0.0.0.0", help="TLS listener address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=broker_config.TLS_PORT, help="TLS port (default 8883)")
    p.add_argument("--plain-port", type=int, default=broker_config.PLAIN_PORT, help="on 127.0.0.1 (1883)")
    p.add_argument("--pki", default="deploy/pki", help="the CA of `fleetvisor ca init` (default deploy/pki)")
    p.add_argument("--tls-ip", action="append", default=[], help="broker certificate IP (default 127.0.0.1)")
    p.add_argument("--tls-dns", action="append", default=[], help="broker certificate DNS (default: ours)")
    p.add_argument("--no-tls", action="store_true", help="no TLS listener: a broker for this machine only")
    p.add_argument("--no-persistence", action="store_true", help="do not persist sessions to disk")
    p.add_argument("--dynsec-plugin", help="mosquitto_dynamic_security.so (default: where Mosquitto puts it)")
    p.set_defaults(func=cmd_broker_config)
    p = sub.add_parser("demo", help="run a whole fleet in one process: broker, controller, sim agents, VMs")
    p.add_argument(
        "--port", type=int, default=ControllerSettings().api_port, help="API port (default %(default)s)"
    )
    p.add_argument("--broker-port", type=int, default=0, help="embedded broker port (default: a free one)")
    p.add_argument("--hosts", type=int, default=0, help="agents to run (default 4 for sim, 2 for qemu)")
    p.add_argument("--vms", type=int, default=0, help="VMs to create (default 12 for sim, 4 for qemu)")
    p.add_argument("--hv", choices=ENGINES, default="sim")
    p.add_argument(
        "--for", dest="for_seconds", type=float, default=None, metavar="SECONDS", help="exit after this long"
    )
    p.add_argument("--state-dir", help="keep the demo's state here (default: a new temporary directory)")
    p.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if operator_cli.is_operator_command(argv):
        # The fast path: an operator command is a REST client and loads no server code.
        args = operator_cli.operator_parser().parse_args(argv)
        _setup_logging(args.verbose)
        logging.getLogger().setLevel(logging.WARNING)
        return operator_cli.run_operator_command(args)
    from controller.state.files import EXIT_BAD_STORE, StoreError
    from protocols.bus import BusError

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.command == "demo" and not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # the demo narrates; logs only for trouble
    try:
        return int(args.func(args))
    except StoreError as exc:
        print(f"fleetvisor {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_STORE
    except (OSError, BusError, ValueError) as exc:
        print(f"fleetvisor {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
