"""``fleetvisor plan``, ``power mode|status`` and ``host power``: the power manager and host power.

It imports only ``controller.cli`` modules of ours.
"""

from __future__ import annotations

import argparse
from typing import Any

from controller.cli import bulk
from controller.cli.exits import EXIT_FAILED, CliError
from controller.cli.render import emit, energy_since, print_json, table
from controller.client import Client
from protocols import rest


def _render_host_power(r: dict[str, Any]) -> str:
    power = r["power"]
    lines = [
        f"host {r['host_id']}: {r['action']}: {r['detail']}",
        f"  power (read by its methods): {r['status']}",
        f"  managed state:               {power['state']}"
        + (f", via {power['method']}" if power["method"] else ""),
        f"  energy:                      {power['energy_kwh']:.4f} kWh{energy_since(power.get('energy_since'))}",
    ]
    check = r.get("wake_check")
    if check:
        lines.append(
            f"  wake path:                   {'verified' if check['ok'] else 'NOT verified'} ({check['method']})"
        )
        lines.append(f"    {check['detail']}")
    return "\n".join(lines)


def cmd_host_power(client: Client, args: argparse.Namespace) -> int:
    """``host power HOST on|off|status``; exits non-zero when the host's wake path does not verify.
    ``host power -l SELECTOR on|off``: every host that matches, as one bulk action.
    """
    words = args.words
    if args.selector:
        if len(words) != 1 or words[0] not in ("on", "off"):
            raise CliError("host power -l SELECTOR takes on or off, and no host name")
        body = rest.BulkRequest(
            action="power", selector=args.selector, on=words[0] == "on", max_parallel=args.max_parallel
        )
        return bulk.run_bulk(client, args, body)
    if len(words) != 2 or words[1] not in ("on", "off", "status"):
        raise CliError("host power takes a host and on, off or status: host power HOST on|off|status")
    args.host, args.action_name = words
    if args.action_name == "status":
        report = client.hosts.power(args.host)
    else:
        report = client.hosts.set_power(args.host, args.action_name)
    emit(args, report, _render_host_power)
    check = report.wake_check
    return EXIT_FAILED if check is not None and not check.ok else 0


def _render_plan(plan: dict[str, Any]) -> str:
    lines = [f"plan (round {plan['round']}, automation level {plan['mode']}): {plan['summary']}"]
    if plan["moves"]:
        lines.append("moves:")
        for m in plan["moves"]:
            lines.append(f"  {m['vm']}: {m['source']} -> {m['target']} ({m['kind']})")
            lines.append(f"      {m['reason']}")
    if plan["power"]:
        lines.append("power:")
        for a in plan["power"]:
            lines.append(f"  {a['host_id']}: {a['action'].replace('_', ' ')}")
            lines.append(f"      {a['reason']}")
    if plan["notes"]:
        lines.append("left alone:")
        lines.extend(f"  - {note}" for note in plan["notes"])
    return "\n".join(lines)


def _render_outcome(outcome: dict[str, Any]) -> str:
    lines = [_render_plan(outcome["plan"]), "results:"]
    if not outcome["results"]:
        lines.append("  nothing was done")
    for r in outcome["results"]:
        mark = (
            "ok  " if r["ok"] else "FAIL" if not r["detail"].startswith(("deferred", "skipped")) else "--  "
        )
        lines.append(f"  {mark} {r['kind'].replace('_', ' ')} {r['subject']}: {r['detail']}")
    return "\n".join(lines)


def cmd_plan(client: Client, args: argparse.Namespace) -> int:
    """``plan [--apply]``: show the power manager's plan, or execute it once and show the results."""
    if not args.apply:
        emit(args, client.power.plan(), _render_plan)
        return 0
    outcome = client.power.apply(timeout=args.timeout)
    emit(args, outcome, _render_outcome)
    failed = [r for r in outcome.results if not r.ok and not r.detail.startswith(("deferred", "skipped"))]
    return EXIT_FAILED if failed else 0


def _render_power(status: dict[str, Any]) -> str:
    lines = [
        f"automation level: {status['mode']} (round {status['round']}, every {status['interval_s']:g}s)",
        f"spare hosts {status['spare_hosts']}, headroom {status['headroom'] * 100:.0f}%, idle rounds "
        f"{status['idle_rounds']}, cooldown {status['cooldown_s']:g}s, at most "
        f"{status['max_migrations_per_round']} migrations per round",
    ]
    rows = [
        [h["host_id"], h["state"], h["method"] or "-", f"{h['energy_kwh']:.4f}", h["energy_source"] or "-"]
        for h in status["hosts"]
    ]
    lines.append(table(rows, ["host", "power", "method", "kwh", "source"]))
    return "\n".join(lines)


def cmd_power_mode(client: Client, args: argparse.Namespace) -> int:
    """``power mode``: switch the automation level (manual, recommend or auto)."""
    status = client.power.set_mode(args.mode)
    if args.json:
        print_json(status)
    else:
        print(f"power manager: automation level {status.mode}")
    return 0


def cmd_power_status(client: Client, args: argparse.Namespace) -> int:
    """``power status``: the automation level, its settings, and each host's power and energy."""
    emit(args, client.power.status(), _render_power)
    return 0
