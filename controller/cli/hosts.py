"""``fleetvisor host list|show|label|maintenance|accept|join-token``: a host's capacity, load, labels
and maintenance, and enrolment (pending hosts, accepting one, one-time join tokens).

Maintenance on evacuates the host through ``controller.cli.migrate``; a host's power is in
``controller.cli.power``. It imports only ``controller.cli`` modules of ours.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from controller.cli import bulk, migrate
from controller.cli.exits import CliError
from controller.cli.render import emit, energy_since, gib, pct, table
from controller.client import Client
from protocols import rest
from protocols.text import printable


def _render_hosts(hosts: list[dict[str, Any]]) -> str:
    rows = []
    for h in hosts:
        caps = h["capabilities"]
        load = h.get("load") or {}
        rows.append(
            [
                h["host_id"],
                _state(h),
                f"{caps['engine']}/{caps['accel']}",
                caps["arch"],
                f"{h['allocated_vcpus']}/{caps['cores']}",
                f"{gib(h['allocated_memory_mib'])}/{gib(caps['memory_mib'])}",
                str(h["vms"]),
                pct(load.get("cpu_util")),
                f"{load['power_w']:.0f}W" if load else "-",
            ]
        )
    return table(rows, ["host", "state", "engine", "arch", "vcpus", "memory", "vms", "cpu", "power"])


def _state(h: dict[str, Any]) -> str:
    """What a host is, as an operator reads it: standby, fenced, failed, suspect, maintenance, online..."""
    power_state = h.get("power_state", "on")
    if power_state != "on":
        return str(power_state)
    health = h.get("health", "up")
    if health in ("fenced", "failed", "suspect"):
        return str(health)
    if not h["online"]:
        return "offline"
    return "maintenance" if h.get("maintenance") else "online"


def _render_host(h: dict[str, Any]) -> str:
    caps = h["capabilities"]
    load = h.get("load") or {}
    lines = [
        f"host:          {h['host_id']}",
        f"state:         {'online' if h['online'] else 'offline'} ({h['state_reason']})",
        f"address:       {h['address']}",
        f"engine:        {caps['engine']} {caps['engine_version']} (accel {caps['accel']})",
        f"cpu:           {caps['arch']}, {caps['cores']} cores, {caps['cpu_vendor']} {caps['cpu_model']}".rstrip(),
        f"features:      {' '.join(caps['cpu_features']) or '-'}",
        f"guest arches:  {' '.join(caps['guest_arches']) or caps['arch']}",
        f"memory:        {gib(caps['memory_mib'])}",
        f"allocated:     {h['allocated_vcpus']} vCPUs, {gib(h['allocated_memory_mib'])} in {h['vms']} VMs",
        f"free:          {h['free_vcpus']} vCPUs, {gib(h['free_memory_mib'])}",
        f"load:          cpu {pct(load.get('cpu_util'))}, power {load.get('power_w', '-')} W"
        if load
        else "load:          -",
        f"agent:         {h['agent_version']}",
        f"health:        {h.get('health', 'up')}" + (", in maintenance" if h["maintenance"] else ""),
        "labels:        " + (", ".join(f"{k}={v}" for k, v in sorted(h.get("labels", {}).items())) or "-"),
        f"power:         {_power_line(h)}",
        f"energy:        {h.get('energy_kwh', 0.0):.4f} kWh{energy_since(h.get('energy_since'))}"
        + (f" ({h['energy_source']})" if h.get("energy_source") else " (no sample yet)"),
    ]
    return "\n".join(lines)


def _power_line(h: dict[str, Any]) -> str:
    state = h.get("power_state", "on")
    if state == "standby" and h.get("standby_since"):
        state += " since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["standby_since"]))
    method = h.get("power_method")
    return f"{state}, via {method}" if method else f"{state} (no power method configured)"


def _render_pending(pending: list[dict[str, Any]]) -> str:
    if not pending:
        return "no host is pending"
    rows = [[p["host_id"], p["address"], str(p["cores"]), gib(p["memory_mib"]), p["reason"]] for p in pending]
    hint = "\naccept one with `fleetvisor host accept HOST`, or drop it with `fleetvisor host forget HOST`"
    return table(rows, ["host", "address", "cores", "memory", "why pending"]) + hint


def cmd_host_list(client: Client, args: argparse.Namespace) -> int:
    """``host list``: every host with its capacity and load; ``--pending``: hosts waiting to be accepted."""
    if getattr(args, "pending", False):
        emit(args, client.hosts.pending(), _render_pending)
    else:
        emit(args, client.hosts.list(args.selector or ""), _render_hosts)
    return 0


def cmd_host_accept(client: Client, args: argparse.Namespace) -> int:
    """``host accept``: a pending host joins the fleet (admin)."""
    client.hosts.accept(args.host)
    print(printable(f"host {args.host} accepted: its VMs and capacity are now part of the fleet"))
    return 0


def cmd_host_join_token(client: Client, args: argparse.Namespace) -> int:
    """``host join-token``: a one-time token a new agent presents (``agent --join-token``) to enrol."""
    made = client.hosts.join_token(args.host or "", ttl_s=args.ttl)
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(made.expires_at))
    scope = f"host {made.host_id}" if made.host_id else "any new host id"
    print(made.token)
    print(f"one-time join token for {scope}, valid until {expires}; it is shown only now", file=sys.stderr)
    return 0


def cmd_host_label(client: Client, args: argparse.Namespace) -> int:
    """``host label``: set (KEY=VALUE) or remove (KEY-) labels; raises ``CliError`` on a malformed one."""
    labels = bulk.label_changes("host", args)
    if args.selector:
        body = rest.BulkRequest(
            action="label", selector=args.selector, labels=labels, max_parallel=args.max_parallel
        )
        return bulk.run_bulk(client, args, body)
    args.host = args.words[0]
    host = client.hosts.update(args.host, labels=labels)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(host.labels.items())) or "none"
    print(printable(f"host {args.host}: labels {shown}"))
    return 0


def cmd_host_maintenance(client: Client, args: argparse.Namespace) -> int:
    """``host maintenance HOST on|off``: with on, also evacuate its VMs unless ``--no-evacuate``.
    ``host maintenance -l SELECTOR on|off``: the same flag on every host that matches, as one bulk
    action (evacuating many hosts at once is not offered: it needs ``--no-evacuate``).
    """
    words = args.words
    if args.selector:
        if len(words) != 1 or words[0] not in ("on", "off"):
            raise CliError("host maintenance -l SELECTOR takes on or off, and no host name")
        if words[0] == "on" and not args.no_evacuate:
            raise CliError(
                "host maintenance -l SELECTOR on only flags the hosts, it does not evacuate many hosts at "
                "once; add --no-evacuate to flag them, or drain them in turn with "
                "`fleetvisor host rolling-maintenance -l SELECTOR`"
            )
        body = rest.BulkRequest(action="maintenance", selector=args.selector, on=words[0] == "on",
                                force=bool(args.force), max_parallel=args.max_parallel)  # fmt: skip
        return bulk.run_bulk(client, args, body)
    if len(words) != 2 or words[1] not in ("on", "off"):
        raise CliError("host maintenance takes a host and on or off: host maintenance HOST on|off")
    args.host, args.mode = words
    host = client.hosts.update(
        args.host, maintenance=args.mode == "on", force=bool(getattr(args, "force", False))
    )
    state = "in maintenance: no new VMs go there" if host.maintenance else "out of maintenance"
    print(printable(f"host {args.host}: {state}"))
    if args.mode == "on" and not args.no_evacuate and host.vms:
        return migrate.evacuate(client, args)
    return 0


def cmd_host_confirm_down(client: Client, args: argparse.Namespace) -> int:
    """``host confirm-down``: the operator's fence acknowledgement; HA restarts the host's HA VMs."""
    result = client.hosts.confirm_down(args.host)
    print(printable(f"host {args.host}: confirmed down (fenced); {result.restarts} HA restart(s) begun"))
    return 0


def cmd_host_forget(client: Client, args: argparse.Namespace) -> int:
    """``host forget``: remove a host that is gone for good, with its VMs' records."""
    removed = client.hosts.forget(args.host).vms_removed
    print(
        printable(
            f"host {args.host} forgotten" + (f"; VM records removed: {', '.join(removed)}" if removed else "")
        )
    )
    return 0


def cmd_host_show(client: Client, args: argparse.Namespace) -> int:
    """``host show``: one host's capabilities, load, power and energy."""
    emit(args, client.hosts.get(args.host), _render_host)
    return 0
