"""``fleetvisor token ...``, ``audit``, ``events`` and ``op ...``: administration and inspection.

It imports only ``controller.cli`` modules of ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from controller.cli.render import emit, finish_op, table
from controller.client import Client, NoAnswer
from protocols import rest
from protocols.text import printable


def _when(ts: float) -> str:
    """A time as the operator reads it: local time, and how long ago (or ahead)."""
    delta = time.time() - ts
    ago = f"{abs(delta):.0f}s" if abs(delta) < 120 else f"{abs(delta) / 60:.0f}min"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({ago} {'ago' if delta >= 0 else 'from now'})"


def _show(op: dict[str, Any]) -> str:
    lines = []
    for key, value in op.items():
        if key in ("created_at", "updated_at", "deadline") and isinstance(value, int | float):
            value = _when(value)
        elif key == "params" and isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        lines.append(f"{key + ':':11} {value}")
    return "\n".join(lines)


def cmd_op_show(client: Client, args: argparse.Namespace) -> int:
    """``op show``: every field of one operation, with readable times."""
    emit(args, client.operations.get(args.op_id), _show)
    return 0


def cmd_op_list(client: Client, args: argparse.Namespace) -> int:
    """``op list``: operations newest first, filtered; ``--all`` follows every page."""
    filters = {"kind": args.kind, "state": args.state, "host": args.host, "vm": args.vm}
    if args.all:
        found = list(client.operations.iterate(**filters, page_size=args.limit))
    else:
        found = client.operations.list(**filters, limit=args.limit).operations
    emit(args, found, _op_table)
    return 0


def _op_table(ops: list[dict[str, Any]]) -> str:
    rows = [
        [o["op_id"], o["kind"], o["vm"], o["host_id"] or "-", o["state"],
         time.strftime("%H:%M:%S", time.localtime(o["created_at"])), (o["error"] or "")[:60]]
        for o in ops
    ]  # fmt: skip
    return table(rows, ["operation", "kind", "vm", "host", "state", "created", "error"])


def cmd_op_wait(client: Client, args: argparse.Namespace) -> int:
    """``op wait``: wait until an operation ends; exit 1 when it failed or is still running."""
    try:
        op = client.operations.wait(args.op_id, timeout=args.timeout)
    except NoAnswer as exc:
        if exc.code != "still_running":
            raise
        op = client.operations.get(args.op_id)
    return finish_op(args, op, f"operation {args.op_id} ({op.kind} {op.vm})")


def cmd_op_cancel(client: Client, args: argparse.Namespace) -> int:
    """``op cancel``: cancel a running operation, and wait for it to end."""
    op = client.operations.cancel(args.op_id, wait=0.0 if args.no_wait else args.timeout)
    return finish_op(args, op, f"operation {args.op_id} ({op.kind} {op.vm}) cancelled; it")


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    """``events [-f]``: print fleet events after ``--since``; with ``--follow``, the live stream, which
    resumes (Last-Event-ID) across a controller restart.
    """
    since = args.since
    try:
        if args.follow:
            stream: Iterable[rest.Event] = client.events.follow(since, notice=_notice)
        else:
            stream = client.events.history(since)
        for event in stream:
            _print_event(event, args.json)
            since = event.seq
    except KeyboardInterrupt:
        print(f"\nstopped following after event #{since}; resume with `fleetvisor events -f --since {since}`",
              file=sys.stderr)  # fmt: skip
    return 0


def _notice(text: str) -> None:
    print(f"fleetvisor: {text}", file=sys.stderr, flush=True)


def _print_event(e: rest.Event, as_json: bool) -> None:
    if as_json:
        print(json.dumps(msgspec.to_builtins(e), sort_keys=True), flush=True)
    else:
        stamp = time.strftime("%H:%M:%S", time.localtime(e.ts))
        print(printable(f"{stamp} #{e.seq:<5} {e.type:<20} {e.message}"), flush=True)


def cmd_token_create(client: Client, args: argparse.Namespace) -> int:
    """``token create``: create a token and print its secret, the only time it is shown."""
    new = client.tokens.create(args.name, args.role)
    if args.json:
        print(json.dumps(msgspec.to_builtins(new), indent=2, sort_keys=True))
    else:
        print(printable(f"token {new.name} ({new.role}); it is shown only this once:"))
        print(new.token)
    return 0


def cmd_token_list(client: Client, args: argparse.Namespace) -> int:
    """``token list``: names, roles and creation times, never the secrets."""
    emit(
        args,
        client.tokens.list(),
        lambda tokens: table(
            [
                [t["name"], t["role"], time.strftime("%Y-%m-%d %H:%M", time.localtime(t["created_at"]))]
                for t in tokens
            ],
            ["name", "role", "created"],
        ),
    )
    return 0


def cmd_token_revoke(client: Client, args: argparse.Namespace) -> int:
    """``token revoke``: revoke a token by name."""
    client.tokens.revoke(args.name)
    print(f"token {args.name}: revoked")
    return 0


def cmd_audit(client: Client, args: argparse.Namespace) -> int:
    """``audit``: the audit log of mutating API requests after ``--since``."""
    records = client.audit.list(args.since, limit=1000)
    emit(
        args,
        records,
        lambda rs: "\n".join(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['ts']))} #{r['seq']:<5} {r['actor']:<12} "
            f"{r['method']:<6} {r['path']} -> {r['status']}"
            for r in rs
        ),
    )
    return 0
