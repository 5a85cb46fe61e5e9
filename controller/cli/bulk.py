"""Bulk actions from the CLI: ``vm stop -l tier=web --max-parallel 5`` and the like.

The lifecycle commands take either a VM name or ``-l SELECTOR``; with a selector they start one bulk
action (``POST /actions``), show its progress (a line that redraws on a terminal, a line every few
seconds otherwise) and end with the report: what failed and why, what was skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from controller.cli.exits import EXIT_FAILED, CliError
from controller.client import Client
from protocols import rest
from protocols.text import printable

Handler = Callable[[Client, argparse.Namespace], int]


def add_arguments(parser: argparse.ArgumentParser, *, max_parallel: int = 5, dry_run: bool = True) -> None:
    """``-l`` and the limits of a bulk action (``dry_run``: also ``--dry-run``, for commands that
    have none of their own).
    """
    g = parser.add_argument_group("many VMs at once (instead of NAME)")
    g.add_argument(
        "-l", "--selector", default="", help="act on every VM that matches, e.g. tier=web,state=running"
    )
    g.add_argument(
        "--max-parallel",
        type=int,
        default=max_parallel,
        help=f"targets acted on at once (default {max_parallel})",
    )
    g.add_argument(
        "--stop-after", type=int, default=0, metavar="N", help="stop after N failures (default: never)"
    )
    if dry_run:
        g.add_argument("--dry-run", action="store_true", help="list what the selector picks; change nothing")


def label_changes(what: str, args: argparse.Namespace) -> dict[str, str | None]:
    """The KEY=VALUE (set) and KEY- (remove) items of ``vm label`` or ``host label``, after the name
    unless ``-l``; raises ``CliError`` on a malformed item.
    """
    words = args.words if args.selector else args.words[1:]
    if not words or (not args.selector and len(args.words) < 2):
        raise CliError(f"{what} label takes a {what} (or -l SELECTOR) and KEY=VALUE or KEY- items")
    labels: dict[str, str | None] = {}
    for item in words:
        if item.endswith("-") and "=" not in item:
            labels[item[:-1]] = None
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"label {item!r}: write KEY=VALUE to set it, or KEY- to remove it")
        labels[key] = value
    return labels


def single_or_bulk(action: str, single: Handler) -> Handler:
    """``single`` for ``vm ACTION NAME``, a bulk action for ``vm ACTION -l SELECTOR``."""

    def run(client: Client, args: argparse.Namespace) -> int:
        if bool(args.name) == bool(args.selector):
            raise CliError(f"vm {action}: give a VM name or -l SELECTOR (one of them)")
        if args.name:
            return single(client, args)
        body = rest.BulkRequest(action=action, selector=args.selector, max_parallel=args.max_parallel,
                                stop_after=args.stop_after, force=bool(getattr(args, "force", False)))  # fmt: skip
        return run_bulk(client, args, body, dry_run=args.dry_run)

    return run


def run_bulk(
    client: Client, args: argparse.Namespace, body: rest.BulkRequest, *, dry_run: bool = False
) -> int:
    """Start a bulk action (or only list its targets), follow it to its end unless ``--no-wait``, and report."""
    if dry_run:
        targets = client.actions.plan(body).targets
        print(f"{body.action} would act on {len(targets)}: {', '.join(printable(t) for t in targets)}")
        return 0
    started = client.actions.start(body)
    op_id = started.op_id
    total = len(started.params["targets"])
    print(f"bulk {body.action} {op_id}: {total} target(s), {body.max_parallel} at a time", file=sys.stderr)
    if args.no_wait:
        print(
            f"it goes on; follow it with `fleetvisor op wait {op_id}`, stop it with `fleetvisor op cancel {op_id}`"
        )
        return 0
    deadline = time.monotonic() + args.timeout
    shown_at = 0.0
    tty = sys.stderr.isatty()
    op = started
    for op in client.operations.follow(op_id, interval=1.0, changes_only=False):
        line = _progress(op.params.get("results", {}), total)
        if tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - shown_at >= 5 or op.state != "running":
            print(line, file=sys.stderr, flush=True)
            shown_at = time.monotonic()
        if op.state == "running" and time.monotonic() > deadline:
            print(f"\nstill running after {args.timeout:g}s; follow it with `fleetvisor op wait {op_id}`")
            return EXIT_FAILED
    if tty:
        print(file=sys.stderr)
    for target, result in sorted(op.params.get("results", {}).items()):
        if not result.startswith("done"):
            print(f"  {printable(target)}: {printable(result)}")
    print(printable(op.error) if op.error else f"bulk {body.action}: all {total} done")
    return 0 if op.state == "succeeded" else EXIT_FAILED


def _progress(results: dict[str, str], total: int) -> str:
    done = sum(r.startswith("done") for r in results.values())
    failed = sum(r.startswith("failed") for r in results.values())
    skipped = sum(r.startswith("skipped") for r in results.values())
    width = 30
    filled = width * len(results) // max(total, 1)
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {len(results)}/{total} settled: "
        f"{done} done, {failed} failed, {skipped} skipped"
    )
