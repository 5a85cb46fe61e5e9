"""Rolling maintenance from the CLI: ``host rolling-maintenance -l rack=3 --exec CMD --return-vms``.

The command starts the roll (``POST /rolling-maintenance``), or with ``--attach OP`` follows one
already under way, and prints each host's phases as they change. When a host waits for its step,
``--exec CMD`` runs CMD here, on the operator's side, with ``FLEETVISOR_HOST`` and
``FLEETVISOR_OPERATION`` in its environment, and tells the controller how it ended; without
``--exec`` the command says how to continue the host by hand (``op continue``). Ctrl-C leaves the
roll running and says how to attach again or cancel it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

from controller.cli.exits import EXIT_FAILED, EXIT_INTERRUPTED, CliError
from controller.client import Client
from protocols import rest
from protocols.migration import MigrationPolicy
from protocols.text import printable


def add_arguments(host: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """``host rolling-maintenance`` under the ``host`` subcommands."""
    p = host.add_parser(
        "rolling-maintenance",
        help="take the hosts a selector picks through maintenance in turn: evacuate, your step, back",
        usage="fleetvisor host rolling-maintenance (-l SELECTOR | --attach OP) [options]",
    )
    p.add_argument("-l", "--selector", default=None, help="the hosts, e.g. rack=3 (taken in name order)")
    p.add_argument("--attach", metavar="OP", help="follow a roll already under way (and run --exec for it)")
    p.add_argument("--max-parallel", type=int, default=1, help="hosts per wave (default 1)")
    p.add_argument("--exec", dest="exec_cmd", metavar="CMD", help="the step, run here for each host "
                   "($FLEETVISOR_HOST names it); a non-zero exit stops the roll")  # fmt: skip
    p.add_argument("--no-step", action="store_true", help="no operator step: each host only goes in and out")
    p.add_argument("--return-vms", action="store_true", help="migrate the VMs back once their host is out")
    p.add_argument(
        "--agent-timeout", type=float, default=900.0, help="seconds an agent may take to come back"
    )
    p.add_argument("--bandwidth", type=float, default=None, metavar="MIB_S",
                   help="each migration's bandwidth (default: a host's whole migration link)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="show the hosts, wave by wave; change nothing")
    return p


def cmd_host_rolling(client: Client, args: argparse.Namespace) -> int:
    if (args.selector is None) == (args.attach is None):
        raise CliError(
            "host rolling-maintenance: give -l SELECTOR (a new roll) or --attach OP (one under way)"
        )
    if args.exec_cmd and args.no_step:
        raise CliError("host rolling-maintenance: --exec is the step; it cannot go with --no-step")
    if args.attach:
        op_id = args.attach
    else:
        body = rest.RollingRequest(
            selector=args.selector,
            max_parallel=args.max_parallel,
            return_vms=args.return_vms,
            step="none" if args.no_step else "continue",
            agent_timeout_s=args.agent_timeout,
            policy=None if args.bandwidth is None else MigrationPolicy(bandwidth_mib_s=args.bandwidth),
        )
        if args.dry_run:
            for n, wave in enumerate(client.rolling.plan(body).waves, 1):
                print(f"wave {n}: {', '.join(printable(h) for h in wave)}")
            return 0
        started = client.rolling.start(body)
        op_id = started.op_id
        print(
            printable(f"rolling maintenance {op_id}: {', '.join(started.params['hosts'])}"), file=sys.stderr
        )
    try:
        return _follow(client, op_id, args.exec_cmd)
    except KeyboardInterrupt:
        print(
            f"\nthe roll goes on ({op_id}); follow it again with `fleetvisor host rolling-maintenance --attach "
            f"{op_id}`, stop it with `fleetvisor op cancel {op_id}`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _follow(client: Client, op_id: str, exec_cmd: str | None) -> int:
    shown: dict[str, tuple[str, int]] = {}
    told: set[str] = set()
    op = client.operations.get(op_id)
    for op in client.operations.follow(op_id, interval=1.0):
        if op.kind != "rolling":
            raise CliError(f"operation {op_id} is a {op.kind}, not a rolling maintenance")
        for host, p in op.params["progress"].items():
            moved = len(p.get("moved", {})) + len(p.get("returned", {}))
            if shown.get(host) != (p["phase"], moved):
                shown[host] = (p["phase"], moved)
                print(_line(host, p), file=sys.stderr, flush=True)
            if p["phase"] == "step" and op.state == "running" and host not in told:
                told.add(host)
                if exec_cmd:
                    _run_step(client, op_id, host, exec_cmd)
                else:
                    print(f"  {host} waits for your step; when it is done: `fleetvisor op continue {op_id} "
                          f"{host}` (or `--failed WHY`)", file=sys.stderr, flush=True)  # fmt: skip
    print(printable(op.error) if op.error else f"rolling maintenance {op_id}: every host done")
    return 0 if op.state == "succeeded" else EXIT_FAILED


def _line(host: str, p: dict[str, Any]) -> str:
    phase = p["phase"]
    if phase == "evacuating":
        plan = p.get("plan", {})
        return f"{host}: evacuating, {len(p.get('moved', {}))}/{len(plan)} VM(s) moved"
    if phase == "returning":
        return f"{host}: returning VMs, {len(p.get('returned', {}))} back or kept"
    if phase in ("failed", "skipped", "cancelled"):
        return f"{host}: {phase}: {printable(p.get('error', ''))}"
    return f"{host}: {phase}"


def _run_step(client: Client, op_id: str, host: str, command: str) -> None:
    print(f"  {host}: running the step: {command}", file=sys.stderr, flush=True)
    env = {**os.environ, "FLEETVISOR_HOST": host, "FLEETVISOR_OPERATION": op_id}
    started = time.monotonic()
    done = subprocess.run(command, shell=True, env=env, check=False)
    took = time.monotonic() - started
    ok = done.returncode == 0
    message = f"`{command}` exited {done.returncode} after {took:.0f}s"
    client.operations.continue_host(op_id, host, ok=ok, message=message)


def cmd_op_continue(client: Client, args: argparse.Namespace) -> int:
    message = args.failed or args.message
    op = client.operations.continue_host(args.op_id, args.host, ok=args.failed is None, message=message)
    phase = op.params["progress"][args.host]["phase"]
    print(f"{args.host}: {phase}" + ("; the roll stops here" if args.failed is not None else ""))
    return 0
