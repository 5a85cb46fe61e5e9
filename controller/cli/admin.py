"""``fleetvisor token ...``, ``audit``, ``events`` and ``op ...``: administration and inspection.

It imports only ``controller.cli`` modules of ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from controller.cli.client import EXIT_UNREACHABLE, ApiClient, CliError
from controller.cli.render import emit, finish_op, table
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


def cmd_op_show(client: ApiClient, args: argparse.Namespace) -> int:
    """``op show``: every field of one operation, with readable times."""
    emit(args, client.request("GET", f"/operations/{args.op_id}"), _show)
    return 0


def cmd_op_list(client: ApiClient, args: argparse.Namespace) -> int:
    """``op list``: operations newest first, filtered; ``--all`` follows every page."""
    params: dict[str, Any] = {"limit": args.limit}
    for name in ("kind", "state", "host", "vm"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    found: list[dict[str, Any]] = []
    while True:
        body = client.request("GET", "/operations", params=params)
        found += body["operations"]
        if not args.all or body["next"] is None:
            break
        params["page"] = body["next"]
    emit(args, found, _op_table)
    return 0


def _op_table(ops: list[dict[str, Any]]) -> str:
    rows = [
        [o["op_id"], o["kind"], o["vm"], o["host_id"] or "-", o["state"],
         time.strftime("%H:%M:%S", time.localtime(o["created_at"])), (o["error"] or "")[:60]]
        for o in ops
    ]  # fmt: skip
    return table(rows, ["operation", "kind", "vm", "host", "state", "created", "error"])


def cmd_op_wait(client: ApiClient, args: argparse.Namespace) -> int:
    """``op wait``: wait until an operation ends; exit 1 when it failed or is still running."""
    deadline = time.monotonic() + args.timeout
    while True:
        left = max(0.0, deadline - time.monotonic())
        op = client.request("GET", f"/operations/{args.op_id}", params={"wait": min(left, 60.0)})
        if op["state"] != "running" or left <= 0:
            break
    return finish_op(args, op, f"operation {args.op_id} ({op['kind']} {op['vm']})")


def cmd_op_cancel(client: ApiClient, args: argparse.Namespace) -> int:
    """``op cancel``: cancel a running migration or evacuation, and wait for it to end."""
    params = {} if args.no_wait else {"wait": args.timeout}
    op = client.request("POST", f"/operations/{args.op_id}/cancel", params=params)
    return finish_op(args, op, f"operation {args.op_id} ({op['kind']} {op['vm']}) cancelled; it")


def cmd_events(client: ApiClient, args: argparse.Namespace) -> int:
    """``events [-f]``: print fleet events after ``--since``, and with ``--follow`` keep polling."""
    since = args.since
    lost = False
    try:
        while True:
            try:
                events = client.request("GET", "/events", params={"since": since, "limit": 1000})
            except CliError as exc:
                if not args.follow or exc.exit_code != EXIT_UNREACHABLE:
                    raise
                if not lost:  # a controller restart: keep asking, from the last event seen
                    print(f"fleetvisor: {exc}; retrying from event #{since}", file=sys.stderr, flush=True)
                lost = True
                time.sleep(1.0)
                continue
            if lost:
                print(
                    f"fleetvisor: the controller answers again; resuming after event #{since}",
                    file=sys.stderr,
                )
                lost = False
            since = _print_events(events, args.json, since)
            if not args.follow:
                return 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"\nstopped following after event #{since}; resume with `fleetvisor events -f --since {since}`",
              file=sys.stderr)  # fmt: skip
        return 0


def _print_events(events: list[dict[str, Any]], as_json: bool, since: int) -> int:
    """Print ``events``; returns the last sequence number printed (``since`` if none)."""
    for e in events:
        if as_json:
            print(json.dumps(e, sort_keys=True), flush=True)
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
            print(printable(f"{stamp} #{e['seq']:<5} {e['type']:<20} {e['message']}"), flush=True)
        since = e["seq"]
    return since


def cmd_token_create(client: ApiClient, args: argparse.Namespace) -> int:
    """``token create``: create a token and print its secret, the only time it is shown."""
    new = client.request("POST", "/tokens", json={"name": args.name, "role": args.role})
    if args.json:
        print(json.dumps(new, indent=2, sort_keys=True))
    else:
        print(f"token {new['name']} ({new['role']}); it is shown only this once:\n{new['token']}")
    return 0


def cmd_token_list(client: ApiClient, args: argparse.Namespace) -> int:
    """``token list``: names, roles and creation times, never the secrets."""
    emit(
        args,
        client.request("GET", "/tokens"),
        lambda tokens: table(
            [
                [t["name"], t["role"], time.strftime("%Y-%m-%d %H:%M", time.localtime(t["created_at"]))]
                for t in tokens
            ],
            ["name", "role", "created"],
        ),
    )
    return 0


def cmd_token_revoke(client: ApiClient, args: argparse.Namespace) -> int:
    """``token revoke``: revoke a token by name."""
    client.request("DELETE", f"/tokens/{args.name}")
    print(f"token {args.name}: revoked")
    return 0


def cmd_audit(client: ApiClient, args: argparse.Namespace) -> int:
    """``audit``: the audit log of mutating API requests after ``--since``."""
    records = client.request("GET", "/audit", params={"since": args.since, "limit": 1000})
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
