"""``fleetvisor token ...``, ``audit``, ``events`` and ``op show``: administration and inspection.

It imports only ``controller.cli`` modules of ours.
"""

from __future__ import annotations

import argparse
import json
import time

from controller.cli.client import ApiClient
from controller.cli.render import emit, table
from protocols.text import printable


def cmd_op_show(client: ApiClient, args: argparse.Namespace) -> int:
    """``op show``: every field of one operation."""
    op = client.request("GET", f"/operations/{args.op_id}")
    emit(args, op, lambda o: "\n".join(f"{k + ':':10} {v}" for k, v in o.items()))
    return 0


def cmd_events(client: ApiClient, args: argparse.Namespace) -> int:
    """``events [-f]``: print fleet events after ``--since``, and with ``--follow`` keep polling."""
    since = args.since
    while True:
        events = client.request("GET", "/events", params={"since": since, "limit": 1000})
        for e in events:
            if args.json:
                print(json.dumps(e, sort_keys=True))
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
                print(printable(f"{stamp} #{e['seq']:<5} {e['type']:<20} {e['message']}"))
            since = e["seq"]
        if not args.follow:
            return 0
        time.sleep(0.5)


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
