"""``fleetvisor vm migrate|migrate-cancel`` and ``host evacuate``, with their progress line.

A migration or evacuation is an operation; unless ``--no-wait``, the CLI polls it and redraws one
progress bar on a terminal. It imports only ``controller.cli`` modules of ours.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from controller.cli import bulk
from controller.cli.exits import EXIT_FAILED, EXIT_INTERRUPTED, CliError
from controller.cli.render import finish_op, print_json, render_explanation
from controller.client import Client
from protocols import rest
from protocols.migration import MigrationPolicy
from protocols.text import printable


def _policy(args: argparse.Namespace) -> MigrationPolicy:
    """The policy the flags give; raises ``CliError`` naming the flag when a value is out of range."""
    try:
        return msgspec.convert(_policy_fields(args), MigrationPolicy)
    except msgspec.ValidationError as exc:
        raise CliError(f"migration policy: {exc}; see `fleetvisor vm migrate --help`") from None


def _policy_fields(args: argparse.Namespace) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "bandwidth_mib_s": args.bandwidth,
        "max_downtime_ms": args.max_downtime,
        "auto_converge": not args.no_auto_converge,
        "postcopy": args.postcopy,
        "xbzrle": args.xbzrle,
        "copy_storage": args.copy_storage,
    }
    if args.downtime_ceiling is not None:
        policy["downtime_ceiling_ms"] = args.downtime_ceiling
    if args.multifd:
        policy.update(multifd=True, multifd_channels=args.multifd)
    return policy


def _bar(fraction: float, width: int = 30) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _follow(
    client: Client, args: argparse.Namespace, op: rest.OperationView, line: Callable[[dict[str, Any]], str]
) -> rest.OperationView:
    """Follow ``op`` until it ends (or ``--timeout``), redrawing one progress line on a terminal."""
    tty = sys.stderr.isatty() and not args.json
    deadline = time.monotonic() + args.timeout
    last = ""
    try:
        for op in client.operations.follow(op.op_id, interval=0.5, changes_only=False):  # noqa: B020 (the latest view is kept)
            if op.state != "running" or time.monotonic() >= deadline:
                break
            text = printable(line(msgspec.to_builtins(op)))
            if text != last:
                if tty:
                    print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
                elif not args.json:
                    print(text, file=sys.stderr, flush=True)
                last = text
    except KeyboardInterrupt:
        if tty and last:
            print(file=sys.stderr)
        raise CliError(
            f"the {op.kind} of {op.vm or op.host_id} goes on (operation {op.op_id}); follow it with "
            f"`fleetvisor op wait {op.op_id}`, cancel it with `fleetvisor op cancel {op.op_id}`",
            EXIT_INTERRUPTED,
        ) from None
    if tty and last:
        print(file=sys.stderr)
    return op


def _migration_line(op: dict[str, Any]) -> str:
    phase = op["params"].get("phase", "?")
    progress = op.get("progress")
    if phase != "send" or not progress:
        return f"{op['vm']}: {phase} ({op['params'].get('from_host')} -> {op['params'].get('to_host')})"
    sample = progress["sample"]
    total = sample["total_bytes"] or 1
    done = (total - sample["remaining_bytes"]) / total
    mib = 1024 * 1024
    return (
        f"{op['vm']} {_bar(done)} {100 * done:3.0f}%  {sample['remaining_bytes'] / mib:7.1f} MiB left  "
        f"dirty {sample['dirty_rate_bytes_s'] / mib:5.1f} MiB/s  round {sample['iteration']}  "
        f"downtime ~{sample['expected_downtime_ms']:.0f} ms  {progress['stage']}"
    )


def cmd_vm_migrate(client: Client, args: argparse.Namespace) -> int:
    """``vm migrate``: live-migrate a VM, or predict how it would go (``--dry-run``); with
    ``-l SELECTOR``, every VM that matches, as one bulk action.
    """
    if bool(args.name) == bool(args.selector):
        raise CliError("vm migrate: give a VM name or -l SELECTOR (one of them)")
    if args.selector:
        if args.force:
            raise CliError(
                "vm migrate -l: --force overrides one VM's rules, with a reason; migrate those one by one"
            )
        many = rest.BulkRequest(action="migrate", selector=args.selector, to=args.to, policy=_policy(args),
                                max_parallel=args.max_parallel, stop_after=args.stop_after)  # fmt: skip
        return bulk.run_bulk(client, args, many, dry_run=args.dry_run)
    if args.dry_run:
        return _plan(client, args)
    op = client.vms.migrate(args.name, to=args.to, policy=_policy(args), force=args.force, reason=args.reason)
    if not args.no_wait:
        op = _follow(client, args, op, _migration_line)
    if op.state == "succeeded" and not args.json:
        result = op.params.get("result") or {}
        print(printable(
            f"vm {args.name}: {op.params['from_host']} -> {op.params['to_host']} in "
            f"{result.get('total_ms', 0):.0f} ms, downtime {result.get('downtime_ms', 0):.0f} ms"
        ))  # fmt: skip
    return finish_op(args, op, f"migrate vm {args.name}")


def _plan(client: Client, args: argparse.Namespace) -> int:
    """``vm migrate --dry-run``: the target and the link model's prediction; exit 1 if it cannot go."""
    plan = client.vms.plan_migration(args.name, to=args.to, policy=_policy(args))
    if args.json:
        print_json(plan)
        return 0
    if plan.target is None or plan.prediction is None:
        print(f"vm {args.name}: no host can take it", file=sys.stderr)
        print(render_explanation(plan.explanation), file=sys.stderr)
        return EXIT_FAILED
    pred = plan.prediction
    print(
        printable(
            f"vm {args.name}: {plan.source} -> {plan.target} (dirtying {plan.dirty_mib_s:.1f} MiB/s now)"
        )
    )
    print(f"  {printable(pred.summary)}")
    print(
        f"  predicted: {pred.total_s:.1f}s in total, {pred.downtime_ms:.0f} ms of downtime, "
        f"{pred.rounds} rounds, {pred.transferred_mib:.0f} MiB sent; "
        + ("converges" if pred.converges else "does NOT converge")
    )
    return 0 if pred.converges else EXIT_FAILED


def cmd_vm_migrate_cancel(client: Client, args: argparse.Namespace) -> int:
    """``vm migrate-cancel``: cancel a VM's migration before the switch-over."""
    op = client.vms.cancel_migration(args.name)
    if not args.no_wait:
        op = _follow(client, args, op, _migration_line)
    if op.state == "failed" and "cancel" in op.error:
        print(printable(f"vm {args.name}: migration cancelled; it stays on {op.params['from_host']}"))
        return 0
    return finish_op(args, op, f"cancel migration of vm {args.name}")


def _evacuation_line(op: dict[str, Any]) -> str:
    vms = op["params"].get("vms", [])
    done = len(op["params"].get("results", {}))
    return f"evacuating {op['host_id']} {_bar(done / (len(vms) or 1))} {done}/{len(vms)} VMs"


def evacuate(client: Client, args: argparse.Namespace) -> int:
    """Live-migrate every running VM off ``args.host`` and print each VM's outcome."""
    op = client.hosts.evacuate(args.host, policy=_policy(args))
    if not args.no_wait:
        op = _follow(client, args, op, _evacuation_line)
    if not args.json and op.state != "running":
        for vm, outcome in sorted(op.params.get("results", {}).items()):
            print(printable(f"  {vm}: {outcome}"))
    return finish_op(args, op, f"evacuate host {args.host}")


def cmd_host_evacuate(client: Client, args: argparse.Namespace) -> int:
    """``host evacuate``: live-migrate every running VM off a host, in waves."""
    return evacuate(client, args)
