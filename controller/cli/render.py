"""Output shared by the command modules: tables, sizes, percentages, and operation outcomes.

A command prints a table or lines for people, or JSON with ``--json`` for scripts; ``emit`` makes
that choice. The client's answers are typed Structs; what is printed is their JSON form (``--json``
shows exactly what the API answered), so the renderers read plain dicts. It imports only
``controller.cli.exits`` and ``protocols`` of ours.

Much of what the CLI shows was written by a host (capabilities, reasons, errors) or a user (names,
labels). Text for people goes through :func:`protocols.text.printable` here: every table cell,
every string ``emit`` hands to a renderer, and an operation's outcome. So a newline, a carriage
return or an ANSI sequence in a host's text shows as an escape and cannot forge a line or steer the
terminal. JSON output (``--json``) is left as is: the JSON encoder escapes control characters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from controller.cli.exits import EXIT_FAILED
from protocols.rest import OperationView
from protocols.text import printable


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Left-aligned columns under upper-case headers, two spaces apart; each cell escaped to one line."""
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def gib(mib: int) -> str:
    """A memory size in MiB, shown in G from 1 GiB up."""
    return f"{mib / 1024:.1f}G" if mib >= 1024 else f"{mib}M"


def pct(value: float | None) -> str:
    """A 0..1 fraction as a whole percentage, or ``-`` when unknown."""
    return "-" if value is None else f"{value * 100:.0f}%"


def emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    """Print an answer (Structs, or plain data) as JSON with ``--json``, else as ``render`` shows its
    JSON form, every string escaped.
    """
    plain = msgspec.to_builtins(data)
    if args.json:
        print(json.dumps(plain, indent=2, sort_keys=True))
    else:
        print(render(shown(plain)))


def print_json(data: Any) -> None:
    """An answer as ``--json`` prints it."""
    print(json.dumps(msgspec.to_builtins(data), indent=2, sort_keys=True))


def shown(data: Any) -> Any:
    """``data`` (decoded JSON) with every string in it, keys included, escaped for a terminal."""
    if isinstance(data, str):
        return printable(data)
    if isinstance(data, dict):
        return {shown(k): shown(v) for k, v in data.items()}
    if isinstance(data, list):
        return [shown(v) for v in data]
    return data


def energy_since(since: float | None) -> str:
    """`` since <local time>`` for an energy counter's start, or nothing when it has none."""
    if since is None:
        return ""
    return " since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))


def render_explanation(explanation: Any) -> str:
    """The scheduler's reasons for a placement: filters, rejections and the best candidates."""
    explanation = shown(msgspec.to_builtins(explanation) or {})
    lines = [
        f"policy {explanation['policy']}: {explanation['candidates']} of {explanation['hosts']} hosts qualify"
    ]
    for name, removed in explanation.get("filtered", {}).items():
        if removed:
            lines.append(f"  filter {name:<22} removed {removed}")
    for reason, count in sorted(explanation.get("rejected", {}).items()):
        lines.append(f"  rejected for {reason:<17} {count}")
    top = explanation.get("top") or []
    if top:
        lines.append("  best candidates:")
        for rank, host in enumerate(top, 1):
            lines.append(f"    {rank}. {host.get('host_id')}  score {host.get('score', 0):.3f}")
    return "\n".join(lines)


def finish_op(args: argparse.Namespace, op: OperationView, what: str) -> int:
    """Print how operation ``op`` ended (or that it goes on) and return the exit code."""
    failed = EXIT_FAILED if op.state == "failed" else 0
    if args.json:
        print_json(op)
        return failed
    what = printable(what)
    if op.state == "succeeded":
        print(f"{what}: done")
    elif op.state == "running":
        print(f"{what}: in progress (operation {op.op_id}); follow it with `fleetvisor op show {op.op_id}`")
    else:
        print(f"{what}: failed: {printable(op.error)}", file=sys.stderr)
    return failed
