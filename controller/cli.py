"""The operator's side of the ``fleetvisor`` CLI: ``vm ...`` and ``host ...``, over the REST API.

It finds the controller with ``--url``, then ``FLEETVISOR_URL``, then ``http://127.0.0.1:8080``.
Output is a table for people and ``--json`` for scripts. Errors come from the controller already
phrased for people; the CLI prints them as they are and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import msgspec

from protocols import domxml
from protocols.vmspec import VmSpec, VmSpecInput, explain_validation_error

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ApiClient:
    """A thin synchronous client of ``/api/v1``."""

    def __init__(
        self, base_url: str, timeout: float = 30.0, token: str | None = None, ca_file: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._http = httpx.Client(
            base_url=f"{self.base_url}/api/v1", timeout=timeout, headers=headers, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CliError(
                f"cannot reach the controller at {self.base_url} ({exc}); start it with `fleetvisor controller` "
                "or `fleetvisor demo`, or point --url / FLEETVISOR_URL at it",
                EXIT_UNREACHABLE,
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 204:
            return None
        if response.status_code >= 400:
            message = body.get("error", {}).get("message") if isinstance(body, dict) else None
            raise CliError(message or f"{method} {path}: HTTP {response.status_code}")
        return body


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f}G" if mib >= 1024 else f"{mib}M"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _print(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(render(data))


# -- hosts ----------------------------------------------------------------------------------------


def _render_hosts(hosts: list[dict[str, Any]]) -> str:
    rows = []
    for h in hosts:
        caps = h["capabilities"]
        load = h.get("load") or {}
        power_state = h.get("power_state", "on")
        rows.append(
            [
                h["host_id"],
                power_state if power_state != "on" else ("online" if h["online"] else "offline"),
                f"{caps['engine']}/{caps['accel']}",
                caps["arch"],
                f"{h['allocated_vcpus']}/{caps['cores']}",
                f"{_gib(h['allocated_memory_mib'])}/{_gib(caps['memory_mib'])}",
                str(h["vms"]),
                _pct(load.get("cpu_util")),
                f"{load['power_w']:.0f}W" if load else "-",
            ]
        )
    return _table(rows, ["host", "state", "engine", "arch", "vcpus", "memory", "vms", "cpu", "power"])


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
        f"memory:        {_gib(caps['memory_mib'])}",
        f"allocated:     {h['allocated_vcpus']} vCPUs, {_gib(h['allocated_memory_mib'])} in {h['vms']} VMs",
        f"free:          {h['free_vcpus']} vCPUs, {_gib(h['free_memory_mib'])}",
        f"load:          cpu {_pct(load.get('cpu_util'))}, power {load.get('power_w', '-')} W"
        if load
        else "load:          -",
        f"agent:         {h['agent_version']}",
        f"health:        {h.get('health', 'up')}" + (", in maintenance" if h["maintenance"] else ""),
        "labels:        " + (", ".join(f"{k}={v}" for k, v in sorted(h.get("labels", {}).items())) or "-"),
        f"power:         {_power_line(h)}",
        f"energy:        {h.get('energy_kwh', 0.0):.4f} kWh{_energy_since(h.get('energy_since'))}"
        + (f" ({h['energy_source']})" if h.get("energy_source") else " (no sample yet)"),
    ]
    return "\n".join(lines)


def _energy_since(since: float | None) -> str:
    if since is None:
        return ""
    return " since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))


def _power_line(h: dict[str, Any]) -> str:
    state = h.get("power_state", "on")
    if state == "standby" and h.get("standby_since"):
        state += " since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["standby_since"]))
    method = h.get("power_method")
    return f"{state}, via {method}" if method else f"{state} (no power method configured)"


def cmd_host_list(client: ApiClient, args: argparse.Namespace) -> int:
    _print(args, client.request("GET", "/hosts"), _render_hosts)
    return 0


def cmd_host_label(client: ApiClient, args: argparse.Namespace) -> int:
    labels: dict[str, str | None] = {}
    for item in args.labels:
        if item.endswith("-") and "=" not in item:
            labels[item[:-1]] = None
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"label {item!r}: write KEY=VALUE to set it, or KEY- to remove it")
        labels[key] = value
    host = client.request("PATCH", f"/hosts/{args.host}", json={"labels": labels})
    shown = ", ".join(f"{k}={v}" for k, v in sorted(host["labels"].items())) or "none"
    print(f"host {args.host}: labels {shown}")
    return 0


def cmd_host_maintenance(client: ApiClient, args: argparse.Namespace) -> int:
    host = client.request("PATCH", f"/hosts/{args.host}", json={"maintenance": args.mode == "on"})
    state = "in maintenance: no new VMs go there" if host["maintenance"] else "out of maintenance"
    print(f"host {args.host}: {state}")
    if args.mode == "on" and not args.no_evacuate and host.get("vms", 0):
        return _evacuate(client, args)
    return 0


def cmd_host_show(client: ApiClient, args: argparse.Namespace) -> int:
    _print(args, client.request("GET", f"/hosts/{args.host}"), _render_host)
    return 0


def _render_host_power(r: dict[str, Any]) -> str:
    power = r["power"]
    lines = [
        f"host {r['host_id']}: {r['action']}: {r['detail']}",
        f"  power (read by its methods): {r['status']}",
        f"  managed state:               {power['state']}"
        + (f", via {power['method']}" if power["method"] else ""),
        f"  energy:                      {power['energy_kwh']:.4f} kWh{_energy_since(power.get('energy_since'))}",
    ]
    check = r.get("wake_check")
    if check:
        lines.append(
            f"  wake path:                   {'verified' if check['ok'] else 'NOT verified'} ({check['method']})"
        )
        lines.append(f"    {check['detail']}")
    return "\n".join(lines)


def cmd_host_power(client: ApiClient, args: argparse.Namespace) -> int:
    if args.action_name == "status":
        report = client.request("GET", f"/hosts/{args.host}/power")
    else:
        report = client.request("POST", f"/hosts/{args.host}/power", json={"action": args.action_name})
    _print(args, report, _render_host_power)
    check = report.get("wake_check")
    return EXIT_FAILED if check is not None and not check["ok"] else 0


# -- the power manager -----------------------------------------------------------------------------


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


def cmd_plan(client: ApiClient, args: argparse.Namespace) -> int:
    if not args.apply:
        _print(args, client.request("GET", "/plan"), _render_plan)
        return 0
    outcome = client.request("POST", "/plan/apply", timeout=args.timeout)
    _print(args, outcome, _render_outcome)
    failed = [
        r for r in outcome["results"] if not r["ok"] and not r["detail"].startswith(("deferred", "skipped"))
    ]
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
    lines.append(_table(rows, ["host", "power", "method", "kwh", "source"]))
    return "\n".join(lines)


def cmd_power_mode(client: ApiClient, args: argparse.Namespace) -> int:
    status = client.request("PUT", "/power/mode", json={"mode": args.mode})
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(f"power manager: automation level {status['mode']}")
    return 0


def cmd_power_status(client: ApiClient, args: argparse.Namespace) -> int:
    _print(args, client.request("GET", "/power"), _render_power)
    return 0


# -- VMs ------------------------------------------------------------------------------------------


def _render_vms(vms: list[dict[str, Any]]) -> str:
    rows = []
    for v in vms:
        spec = v["spec"]
        load = v.get("load") or {}
        host = v["host_id"] or "-"
        if v["host_id"] and v.get("host_online") is False:
            host += " (offline)"
        rows.append(
            [
                v["name"],
                v["state"],
                host,
                str(spec["vcpus"]),
                _gib(spec["memory_mib"]),
                _pct(load.get("cpu_util")),
            ]
        )
    return _table(rows, ["name", "state", "host", "vcpus", "memory", "cpu"])


def _render_vm(v: dict[str, Any]) -> str:
    spec = v["spec"]
    lines = [
        f"vm:        {v['name']}",
        f"uuid:      {v['uuid']}",
        f"state:     {v['state']}" + (f" (operation {v['operation']})" if v.get("operation") else ""),
        f"host:      {v['host_id'] or '-'}",
        f"vcpus:     {spec['vcpus']}",
        f"memory:    {_gib(spec['memory_mib'])}",
        f"disk:      {spec['disk_gib']} GiB",
        f"arch:      {spec['arch']}",
    ]
    if spec.get("labels"):
        lines.append("labels:    " + ", ".join(f"{k}={val}" for k, val in sorted(spec["labels"].items())))
    if v.get("load"):
        lines.append(
            f"load:      cpu {_pct(v['load']['cpu_util'])}, dirtying {v['load']['dirty_mib_s']} MiB/s"
        )
    if v.get("error"):
        lines.append(f"error:     {v['error']}")
    return "\n".join(lines)


def _load_spec_file(path: str) -> dict[str, Any]:
    file = pathlib.Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read spec file {path!r}: {exc.strerror}") from None
    try:
        data = msgspec.yaml.decode(raw) if file.suffix in (".yaml", ".yml") else msgspec.json.decode(raw)
    except (msgspec.DecodeError, ImportError) as exc:
        raise CliError(
            f"spec file {path!r} is not valid {'YAML' if file.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise CliError(
            f"spec file {path!r} must hold one object (a mapping of fields), not {type(data).__name__}"
        )
    return data


def _load_domain_xml(path: str) -> dict[str, Any]:
    try:
        text = pathlib.Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read domain XML {path!r}: {exc}") from None
    try:
        spec = domxml.spec_from_xml(text)
    except domxml.DomainXmlError as exc:
        raise CliError(f"domain XML {path!r}: {exc}") from None
    body: dict[str, Any] = msgspec.to_builtins(spec)
    return body


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The create body from a spec file and/or flags (flags win), validated locally first."""
    if args.file and args.xml:
        raise CliError("vm create: give either --file or --xml, not both")
    body: dict[str, Any] = _load_spec_file(args.file) if args.file else {}
    if args.xml:
        body = _load_domain_xml(args.xml)
    if args.name:
        body["name"] = args.name
    if args.ha:
        body["ha"] = True
    for flag, key in (
        ("vcpus", "vcpus"),
        ("memory", "memory_mib"),
        ("disk", "disk_gib"),
        ("arch", "arch"),
        ("ha_priority", "ha_priority"),
    ):
        value = getattr(args, flag)
        if value is not None:
            body[key] = value
    if args.label:
        labels = dict(body.get("labels") or {})
        for item in args.label:
            key, sep, value = item.partition("=")
            if not sep:
                raise CliError(f"--label {item!r}: write it as KEY=VALUE, e.g. --label zone=a")
            labels[key] = value
        body["labels"] = labels
    if "name" not in body:
        raise CliError("vm create: give the VM a name (positional NAME or `name:` in --file)")
    scheduling: dict[str, Any] = dict(body.pop("scheduling", None) or {})
    if args.group:
        scheduling["group"] = args.group
    if args.group_policy:
        scheduling["group_policy"] = args.group_policy
    for item in args.require or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--require {item!r}: write it as KEY=VALUE, e.g. --require zone=a")
        scheduling.setdefault("require", {})[key] = value
    for flag, key in (("host", "hosts"), ("avoid_host", "avoid_hosts"), ("feature", "required_features")):
        if getattr(args, flag):
            scheduling[key] = list(getattr(args, flag))
    if args.policy:
        scheduling["policy"] = args.policy
    if scheduling:
        body["scheduling"] = scheduling
    if args.count != 1:
        body["count"] = args.count
    spec_only = {k: v for k, v in body.items() if k not in ("scheduling", "count")}
    try:
        msgspec.convert(spec_only, VmSpecInput)
    except msgspec.ValidationError as exc:
        raise CliError(f"vm spec: {explain_validation_error(exc)}") from None
    return body


def _render_explanation(explanation: dict[str, Any]) -> str:
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


def _wait_args(args: argparse.Namespace) -> dict[str, float]:
    return {} if args.no_wait else {"wait": args.timeout}


def _finish_op(args: argparse.Namespace, op: dict[str, Any], what: str) -> int:
    if args.json:
        print(json.dumps(op, indent=2, sort_keys=True))
    elif op["state"] == "succeeded":
        print(f"{what}: done")
    elif op["state"] == "running":
        print(
            f"{what}: in progress (operation {op['op_id']}); follow it with `fleetvisor op show {op['op_id']}`"
        )
    else:
        print(f"{what}: failed: {op['error']}", file=sys.stderr)
    return EXIT_FAILED if op["state"] == "failed" else 0


def cmd_vm_create(client: ApiClient, args: argparse.Namespace) -> int:
    body = build_spec(args)
    params: dict[str, Any] = {"start": str(not args.no_start).lower(), **_wait_args(args)}
    if args.dry_run:
        params = {"dry_run": "true"}
        try:
            plan = client.request("POST", "/vms", json=body, params=params)
        except CliError as exc:
            raise CliError(f"dry run: {exc}") from None
        if args.json:
            print(json.dumps(plan, indent=2, sort_keys=True))
        else:
            print(f"vm {plan['vm']} would go to {plan['host_id']} (nothing was claimed)")
            print(_render_explanation(plan["explanation"]))
        return 0
    if args.explain:
        params["explain"] = "true"
    result = client.request("POST", "/vms", json=body, params=params)
    if "vms" in result:
        return _finish_batch(args, result)
    op, vm = result["operation"], result["vm"]
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return EXIT_FAILED if op["state"] == "failed" else 0
    if op["state"] == "failed":
        print(f"vm {body['name']}: create failed: {op['error']}", file=sys.stderr)
        return EXIT_FAILED
    state = "created" if op["state"] == "succeeded" else "creating"
    print(f"vm {vm['name']}: {state} on {vm['host_id']} (state {vm['state']}, operation {op['op_id']})")
    if result.get("explanation"):
        print(_render_explanation(result["explanation"]))
    return 0


def _finish_batch(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        rows = [[r["vm"]["name"], r["vm"]["host_id"] or "-", r["operation"]["state"]] for r in result["vms"]]
        print(_table(rows, ["vm", "host", "operation"]))
    return EXIT_FAILED if any(r["operation"]["state"] == "failed" for r in result["vms"]) else 0


def cmd_vm_list(client: ApiClient, args: argparse.Namespace) -> int:
    params = {"host": args.host} if args.host else {}
    _print(args, client.request("GET", "/vms", params=params), _render_vms)
    return 0


def cmd_vm_show(client: ApiClient, args: argparse.Namespace) -> int:
    _print(args, client.request("GET", f"/vms/{args.name}"), _render_vm)
    return 0


def cmd_vm_dumpxml(client: ApiClient, args: argparse.Namespace) -> int:
    vm = client.request("GET", f"/vms/{args.name}")
    try:
        print(domxml.spec_to_xml(msgspec.convert(vm["spec"], VmSpec)), end="")
    except domxml.DomainXmlError as exc:
        raise CliError(f"vm {args.name!r} cannot be written as libvirt XML: {exc}") from None
    return 0


def cmd_vm_start(client: ApiClient, args: argparse.Namespace) -> int:
    return _finish_op(
        args, client.request("POST", f"/vms/{args.name}/start", params=_wait_args(args)), f"start {args.name}"
    )


def cmd_vm_action(action: str) -> Callable[[ApiClient, argparse.Namespace], int]:
    def run(client: ApiClient, args: argparse.Namespace) -> int:
        op = client.request("POST", f"/vms/{args.name}/{action}", params=_wait_args(args))
        return _finish_op(args, op, f"{action} {args.name}")

    return run


def cmd_vm_stop(client: ApiClient, args: argparse.Namespace) -> int:
    op = client.request("POST", f"/vms/{args.name}/stop", params=_wait_args(args), json={"force": args.force})
    return _finish_op(args, op, f"stop {args.name}")


def cmd_vm_delete(client: ApiClient, args: argparse.Namespace) -> int:
    return _finish_op(
        args, client.request("DELETE", f"/vms/{args.name}", params=_wait_args(args)), f"delete {args.name}"
    )


# -- migration and evacuation ----------------------------------------------------------------------


def _policy(args: argparse.Namespace) -> dict[str, Any]:
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
    client: ApiClient, args: argparse.Namespace, op: dict[str, Any], line: Callable[[dict[str, Any]], str]
) -> dict[str, Any]:
    """Poll ``op`` until it ends (or ``--timeout``), redrawing one progress line on a terminal."""
    tty = sys.stderr.isatty() and not args.json
    deadline = time.monotonic() + args.timeout
    last = ""
    while op["state"] == "running" and time.monotonic() < deadline:
        text = line(op)
        if text != last:
            if tty:
                print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
            elif not args.json:
                print(text, file=sys.stderr, flush=True)
            last = text
        time.sleep(0.3)
        op = client.request("GET", f"/operations/{op['op_id']}")
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


def cmd_vm_migrate(client: ApiClient, args: argparse.Namespace) -> int:
    body = {"to": args.to, "policy": _policy(args)}
    if args.dry_run:
        plan = client.request("POST", f"/vms/{args.name}/migrate", params={"dry_run": "true"}, json=body)
        if args.json:
            print(json.dumps(plan, indent=2, sort_keys=True))
            return 0
        if plan["target"] is None:
            print(f"vm {args.name}: no host can take it", file=sys.stderr)
            print(_render_explanation(plan.get("explanation") or {}), file=sys.stderr)
            return EXIT_FAILED
        pred = plan["prediction"]
        print(
            f"vm {args.name}: {plan['source']} -> {plan['target']} (dirtying {plan['dirty_mib_s']:.1f} MiB/s now)"
        )
        print(f"  {pred['summary']}")
        print(
            f"  predicted: {pred['total_s']:.1f}s in total, {pred['downtime_ms']:.0f} ms of downtime, "
            f"{pred['rounds']} rounds, {pred['transferred_mib']:.0f} MiB sent; "
            + ("converges" if pred["converges"] else "does NOT converge")
        )
        return 0 if pred["converges"] else EXIT_FAILED
    op = client.request("POST", f"/vms/{args.name}/migrate", json=body)
    if not args.no_wait:
        op = _follow(client, args, op, _migration_line)
    if op["state"] == "succeeded" and not args.json:
        result = op["params"].get("result") or {}
        print(
            f"vm {args.name}: {op['params']['from_host']} -> {op['params']['to_host']} in "
            f"{result.get('total_ms', 0):.0f} ms, downtime {result.get('downtime_ms', 0):.0f} ms"
        )
    return _finish_op(args, op, f"migrate vm {args.name}")


def cmd_vm_migrate_cancel(client: ApiClient, args: argparse.Namespace) -> int:
    op = client.request("POST", f"/vms/{args.name}/migrate/cancel")
    if not args.no_wait:
        op = _follow(client, args, op, _migration_line)
    if op["state"] == "failed" and "cancel" in op["error"]:
        print(f"vm {args.name}: migration cancelled; it stays on {op['params']['from_host']}")
        return 0
    return _finish_op(args, op, f"cancel migration of vm {args.name}")


def _evacuation_line(op: dict[str, Any]) -> str:
    vms = op["params"].get("vms", [])
    done = len(op["params"].get("results", {}))
    return f"evacuating {op['host_id']} {_bar(done / (len(vms) or 1))} {done}/{len(vms)} VMs"


def _evacuate(client: ApiClient, args: argparse.Namespace) -> int:
    op = client.request("POST", f"/hosts/{args.host}/evacuate", json={"policy": _policy(args)})
    if not args.no_wait:
        op = _follow(client, args, op, _evacuation_line)
    if not args.json and op["state"] != "running":
        for vm, outcome in sorted(op["params"].get("results", {}).items()):
            print(f"  {vm}: {outcome}")
    return _finish_op(args, op, f"evacuate host {args.host}")


def cmd_host_evacuate(client: ApiClient, args: argparse.Namespace) -> int:
    return _evacuate(client, args)


def cmd_op_show(client: ApiClient, args: argparse.Namespace) -> int:
    op = client.request("GET", f"/operations/{args.op_id}")
    _print(args, op, lambda o: "\n".join(f"{k + ':':10} {v}" for k, v in o.items()))
    return 0


def cmd_events(client: ApiClient, args: argparse.Namespace) -> int:
    since = args.since
    while True:
        events = client.request("GET", "/events", params={"since": since, "limit": 1000})
        for e in events:
            if args.json:
                print(json.dumps(e, sort_keys=True))
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
                print(f"{stamp} #{e['seq']:<5} {e['type']:<20} {e['message']}")
            since = e["seq"]
        if not args.follow:
            return 0
        time.sleep(0.5)


# -- tokens and audit ----------------------------------------------------------------------------


def cmd_token_create(client: ApiClient, args: argparse.Namespace) -> int:
    new = client.request("POST", "/tokens", json={"name": args.name, "role": args.role})
    if args.json:
        print(json.dumps(new, indent=2, sort_keys=True))
    else:
        print(f"token {new['name']} ({new['role']}); it is shown only this once:\n{new['token']}")
    return 0


def cmd_token_list(client: ApiClient, args: argparse.Namespace) -> int:
    _print(
        args,
        client.request("GET", "/tokens"),
        lambda tokens: _table(
            [
                [t["name"], t["role"], time.strftime("%Y-%m-%d %H:%M", time.localtime(t["created_at"]))]
                for t in tokens
            ],
            ["name", "role", "created"],
        ),
    )
    return 0


def cmd_token_revoke(client: ApiClient, args: argparse.Namespace) -> int:
    client.request("DELETE", f"/tokens/{args.name}")
    print(f"token {args.name}: revoked")
    return 0


def cmd_audit(client: ApiClient, args: argparse.Namespace) -> int:
    records = client.request("GET", "/audit", params={"since": args.since, "limit": 1000})
    _print(
        args,
        records,
        lambda rs: "\n".join(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['ts']))} #{r['seq']:<5} {r['actor']:<12} "
            f"{r['method']:<6} {r['path']} -> {r['status']}"
            for r in rs
        ),
    )
    return 0


# -- parser ---------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=None, help=f"controller URL (env FLEETVISOR_URL, default {DEFAULT_URL})"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--token", default=None, help="API bearer token (env FLEETVISOR_TOKEN)")
    parser.add_argument(
        "--ca-file", default=None, help="CA certificate for an https:// controller (env FLEETVISOR_CA)"
    )


def _waiting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", action="store_true", help="return at once; the operation goes on")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the operation (default 120)"
    )


def _policy_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("migration policy")
    g.add_argument(
        "--bandwidth", type=float, default=1024.0, metavar="MIB_S", help="link share, MiB/s (default 1024)"
    )
    g.add_argument(
        "--max-downtime", type=int, default=300, metavar="MS", help="allowed downtime at first (default 300)"
    )
    g.add_argument(
        "--downtime-ceiling",
        type=int,
        default=None,
        metavar="MS",
        help="the most the downtime may be raised to (default 2000)",
    )
    g.add_argument("--no-auto-converge", action="store_true", help="never throttle the guest's vCPUs")
    g.add_argument("--xbzrle", action="store_true", help="send deltas of re-dirtied pages")
    g.add_argument("--multifd", type=int, default=0, metavar="N", help="send over N parallel channels")
    g.add_argument(
        "--postcopy",
        action="store_true",
        help="allow post-copy as the last resort. It always converges but CANNOT be rolled back: "
        "a network or host failure during post-copy loses the VM",
    )
    g.add_argument(
        "--copy-storage", action="store_true", help="copy local disks over NBD (else storage must be shared)"
    )


def add_operator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``vm``, ``host``, ``op``, ``events``, ``plan`` and ``power`` under the top-level parser."""
    vm = sub.add_parser("vm", help="create, inspect and control VMs").add_subparsers(
        dest="action", required=True
    )

    p = vm.add_parser("create", help="create a VM: the controller places it, then it starts")
    p.add_argument("name", nargs="?", help="VM name (lower-case letters, digits, '-')")
    p.add_argument("-f", "--file", help="spec file, YAML or JSON; flags override its fields")
    p.add_argument("--xml", metavar="FILE", help="libvirt domain XML to import; flags override its fields")
    p.add_argument("--vcpus", type=int)
    p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB")
    p.add_argument("--disk", type=int, metavar="GIB", help="disk in GiB")
    p.add_argument("--arch", help="guest architecture (default x86_64)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--no-start", action="store_true", help="define it but leave it stopped")
    p.add_argument("--ha", action="store_true", help="restart it elsewhere if its host fails (after fencing)")
    p.add_argument("--ha-priority", type=int, help="HA restart order, 0-1000, higher first")
    p.add_argument("--count", type=int, default=1, help="create N VMs named NAME-1..N, planned as a whole")
    p.add_argument("--group", help="server group the VM(s) join")
    p.add_argument(
        "--group-policy",
        choices=("anti-affinity", "affinity", "soft-anti-affinity", "soft-affinity"),
        help="how the group's members relate (default anti-affinity when --group is given)",
    )
    p.add_argument("--anti-affinity", dest="group_policy", action="store_const", const="anti-affinity")
    p.add_argument("--affinity", dest="group_policy", action="store_const", const="affinity")
    p.add_argument("--require", action="append", metavar="KEY=VALUE", help="host label the host must carry")
    p.add_argument(
        "--host", action="append", metavar="HOST", help="only these hosts may take it (repeatable)"
    )
    p.add_argument("--avoid-host", action="append", metavar="HOST", help="never these hosts (repeatable)")
    p.add_argument("--feature", action="append", metavar="FLAG", help="required host CPU feature, e.g. vmx")
    p.add_argument(
        "--policy", choices=("pack", "spread", "power-saving", "best-fit"), help="placement policy"
    )
    p.add_argument("--explain", action="store_true", help="show why the scheduler chose the host")
    p.add_argument("--dry-run", action="store_true", help="show where it would go, and why; create nothing")
    _common(p)
    _waiting(p)
    p.set_defaults(handler=cmd_vm_create)

    p = vm.add_parser("list", help="list VMs")
    p.add_argument("--host", help="only VMs on this host")
    _common(p)
    p.set_defaults(handler=cmd_vm_list)

    for name, handler, text in (
        ("show", cmd_vm_show, "show one VM"),
        ("start", cmd_vm_start, "start a stopped VM"),
        ("stop", cmd_vm_stop, "stop a VM (ACPI shutdown; --force powers it off at once)"),
        ("pause", cmd_vm_action("pause"), "pause a VM (its vCPUs stop; memory stays)"),
        ("resume", cmd_vm_action("resume"), "resume a paused VM"),
        ("reboot", cmd_vm_action("reboot"), "reset a running VM"),
        ("delete", cmd_vm_delete, "delete a VM (stops it first)"),
    ):
        p = vm.add_parser(name, help=text)
        p.add_argument("name")
        _common(p)
        if name != "show":
            _waiting(p)
        if name == "stop":
            p.add_argument(
                "--force", action="store_true", help="power off at once instead of asking the guest"
            )
        p.set_defaults(handler=handler)

    p = vm.add_parser(
        "migrate",
        help="live-migrate a running VM to another host (waits with a progress bar)",
        description="Live-migrate a running VM. Pre-copy first; when the guest dirties memory faster "
        "than the link carries it, the allowed downtime is raised, then auto-converge throttles the "
        "guest, then (only with --postcopy) the migration switches to post-copy, else it aborts and "
        "the VM stays on its source. WARNING: post-copy cannot be rolled back; if the network or "
        "either host fails during post-copy, the VM is lost.",
    )
    p.add_argument("name")
    p.add_argument("--to", default=None, metavar="HOST", help="target host (default: the scheduler chooses)")
    p.add_argument(
        "--dry-run", action="store_true", help="predict time, downtime and convergence; move nothing"
    )
    _policy_args(p)
    _common(p)
    _waiting(p)
    p.set_defaults(handler=cmd_vm_migrate, timeout=3600.0)
    p = vm.add_parser("migrate-cancel", help="cancel a VM's migration before the switch-over")
    p.add_argument("name")
    _common(p)
    _waiting(p)
    p.set_defaults(handler=cmd_vm_migrate_cancel)

    p = vm.add_parser("dumpxml", help="print a VM's spec as libvirt domain XML")
    p.add_argument("name")
    _common(p)
    p.set_defaults(handler=cmd_vm_dumpxml)

    host = sub.add_parser("host", help="inspect hosts").add_subparsers(dest="action", required=True)
    p = host.add_parser("list", help="list hosts with their capacity and load")
    _common(p)
    p.set_defaults(handler=cmd_host_list)
    p = host.add_parser("show", help="show one host's capabilities and load")
    p.add_argument("host")
    _common(p)
    p.set_defaults(handler=cmd_host_show)
    p = host.add_parser("label", help="set (KEY=VALUE) or remove (KEY-) operator labels of a host")
    p.add_argument("host")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    _common(p)
    p.set_defaults(handler=cmd_host_label)
    p = host.add_parser("maintenance", help="put a host in maintenance (no new placements) or take it out")
    p.add_argument("host")
    p.add_argument("mode", choices=("on", "off"))
    p.add_argument("--no-evacuate", action="store_true", help="with on: leave running VMs where they are")
    _policy_args(p)
    _common(p)
    _waiting(p)
    p.set_defaults(handler=cmd_host_maintenance, timeout=3600.0)
    p = host.add_parser("evacuate", help="live-migrate every running VM off a host, in waves")
    p.add_argument("host")
    _policy_args(p)
    _common(p)
    _waiting(p)
    p.set_defaults(handler=cmd_host_evacuate, timeout=3600.0)

    p = host.add_parser(
        "power",
        help="a host's power: status (and whether its wake path verifies), on, or off (standby; it must be empty)",
    )
    p.add_argument("host")
    p.add_argument("action_name", metavar="on|off|status", choices=("on", "off", "status"))
    _common(p)
    p.set_defaults(handler=cmd_host_power)

    p = sub.add_parser(
        "plan", help="the power manager's recommendation, each move and power action with its reason"
    )
    p.add_argument(
        "--apply", action="store_true", help="execute it once (automation levels manual and recommend)"
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait for --apply to finish (default 3600)"
    )
    _common(p)
    p.set_defaults(handler=cmd_plan)

    power = sub.add_parser("power", help="the power manager: automation level and status").add_subparsers(
        dest="action", required=True
    )
    p = power.add_parser("mode", help="switch the automation level: manual, recommend or auto")
    p.add_argument("mode", choices=("manual", "recommend", "auto"))
    _common(p)
    p.set_defaults(handler=cmd_power_mode)
    p = power.add_parser("status", help="automation level, settings, and each host's power and energy")
    _common(p)
    p.set_defaults(handler=cmd_power_status)

    op = sub.add_parser("op", help="inspect operations").add_subparsers(dest="action", required=True)
    p = op.add_parser("show", help="show an operation")
    p.add_argument("op_id")
    _common(p)
    p.set_defaults(handler=cmd_op_show)

    token = sub.add_parser("token", help="manage API tokens (admin)").add_subparsers(
        dest="action", required=True
    )
    p = token.add_parser("create", help="create a token; it is printed once")
    p.add_argument("name")
    p.add_argument("--role", choices=("viewer", "operator", "admin"), default="viewer")
    _common(p)
    p.set_defaults(handler=cmd_token_create)
    p = token.add_parser("list", help="list tokens (names and roles, never the secrets)")
    _common(p)
    p.set_defaults(handler=cmd_token_list)
    p = token.add_parser("revoke", help="revoke a token")
    p.add_argument("name")
    _common(p)
    p.set_defaults(handler=cmd_token_revoke)

    p = sub.add_parser("audit", help="the audit log of mutating API requests (admin)")
    p.add_argument("--since", type=int, default=0)
    _common(p)
    p.set_defaults(handler=cmd_audit)

    p = sub.add_parser("events", help="print fleet events (-f to follow)")
    p.add_argument("--since", type=int, default=0, help="start after this event sequence number")
    p.add_argument("-f", "--follow", action="store_true")
    _common(p)
    p.set_defaults(handler=cmd_events)


def run_operator_command(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("FLEETVISOR_URL") or DEFAULT_URL
    ca_file = args.ca_file or os.environ.get("FLEETVISOR_CA")
    try:
        client = ApiClient(url, token=args.token or os.environ.get("FLEETVISOR_TOKEN"), ca_file=ca_file)
    except (OSError, ssl.SSLError) as exc:
        print(f"fleetvisor: cannot load the CA certificate {ca_file!r}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        code: int = args.handler(client, args)
        return code
    except CliError as exc:
        print(f"fleetvisor: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        client.close()


OPERATOR_COMMANDS: Sequence[str] = ("vm", "host", "op", "events", "token", "audit", "plan", "power")
