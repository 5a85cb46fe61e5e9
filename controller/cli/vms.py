"""``fleetvisor vm create|list|show|start|stop|pause|resume|reboot|delete|dumpxml``.

Migration is in ``controller.cli.migrate``; the create body is built by ``controller.cli.spec``. It
imports ``protocols`` and ``controller.cli`` modules, nothing else of ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from controller.cli.client import EXIT_FAILED, ApiClient, CliError
from controller.cli.render import emit, finish_op, gib, pct, render_explanation, table
from controller.cli.spec import build_spec
from protocols import domxml
from protocols.text import printable
from protocols.vmspec import VmSpec


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
                gib(spec["memory_mib"]),
                pct(load.get("cpu_util")),
            ]
        )
    return table(rows, ["name", "state", "host", "vcpus", "memory", "cpu"])


def _render_vm(v: dict[str, Any]) -> str:
    spec = v["spec"]
    lines = [
        f"vm:        {v['name']}",
        f"uuid:      {v['uuid']}",
        f"state:     {v['state']}" + (f" (operation {v['operation']})" if v.get("operation") else ""),
        f"host:      {v['host_id'] or '-'}",
        f"vcpus:     {spec['vcpus']}",
        f"memory:    {gib(spec['memory_mib'])}",
        f"disk:      {spec['disk_gib']} GiB",
        f"arch:      {spec['arch']}",
    ]
    if spec.get("labels"):
        lines.append("labels:    " + ", ".join(f"{k}={val}" for k, val in sorted(spec["labels"].items())))
    if v.get("load"):
        lines.append(
            f"load:      cpu {pct(v['load']['cpu_util'])}, dirtying {v['load']['dirty_mib_s']} MiB/s"
        )
    if v.get("error"):
        lines.append(f"error:     {v['error']}")
    return "\n".join(lines)


def _wait_args(args: argparse.Namespace) -> dict[str, float]:
    return {} if args.no_wait else {"wait": args.timeout}


def cmd_vm_create(client: ApiClient, args: argparse.Namespace) -> int:
    """``vm create``: place and create one VM or ``--count`` of them, or only show where (``--dry-run``)."""
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
            return 0
        for one in plan.get("vms", [plan]):
            print(f"vm {one['vm']} would go to {one['host_id']} (nothing was claimed)")
            if args.explain or "vms" not in plan:
                print(render_explanation(one["explanation"]))
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
        print(printable(f"vm {body['name']}: create failed: {op['error']}"), file=sys.stderr)
        return EXIT_FAILED
    state = "created" if op["state"] == "succeeded" else "creating"
    print(f"vm {vm['name']}: {state} on {vm['host_id']} (state {vm['state']}, operation {op['op_id']})")
    if result.get("explanation"):
        print(render_explanation(result["explanation"]))
    return 0


def _finish_batch(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        rows = [[r["vm"]["name"], r["vm"]["host_id"] or "-", r["operation"]["state"]] for r in result["vms"]]
        print(table(rows, ["vm", "host", "operation"]))
        for r in result["vms"]:
            if r.get("explanation"):
                print(f"\n{r['vm']['name']}:")
                print(render_explanation(r["explanation"]))
    return EXIT_FAILED if any(r["operation"]["state"] == "failed" for r in result["vms"]) else 0


def cmd_vm_list(client: ApiClient, args: argparse.Namespace) -> int:
    """``vm list``: every VM, or those on ``--host``."""
    params = {"host": args.host} if args.host else {}
    if args.selector:
        params["selector"] = args.selector
    emit(args, client.request("GET", "/vms", params=params), _render_vms)
    return 0


def cmd_vm_show(client: ApiClient, args: argparse.Namespace) -> int:
    """``vm show``: one VM's spec, state, host and load."""
    emit(args, client.request("GET", f"/vms/{args.name}"), _render_vm)
    return 0


def cmd_vm_dumpxml(client: ApiClient, args: argparse.Namespace) -> int:
    """``vm dumpxml``: a VM's spec as libvirt domain XML; raises ``CliError`` if it has no XML form."""
    vm = client.request("GET", f"/vms/{args.name}")
    try:
        print(domxml.spec_to_xml(msgspec.convert(vm["spec"], VmSpec)), end="")
    except domxml.DomainXmlError as exc:
        raise CliError(f"vm {args.name!r} cannot be written as libvirt XML: {exc}") from None
    return 0


def cmd_vm_start(client: ApiClient, args: argparse.Namespace) -> int:
    """``vm start``: start a stopped VM."""
    return finish_op(
        args, client.request("POST", f"/vms/{args.name}/start", params=_wait_args(args)), f"start {args.name}"
    )


def cmd_vm_action(action: str) -> Callable[[ApiClient, argparse.Namespace], int]:
    """The handler of ``vm <action>`` for a plain operation (pause, resume, reboot)."""

    def run(client: ApiClient, args: argparse.Namespace) -> int:
        op = client.request("POST", f"/vms/{args.name}/{action}", params=_wait_args(args))
        return finish_op(args, op, f"{action} {args.name}")

    return run


def cmd_vm_stop(client: ApiClient, args: argparse.Namespace) -> int:
    """``vm stop [--force]``: ACPI shutdown, or power off at once."""
    op = client.request("POST", f"/vms/{args.name}/stop", params=_wait_args(args), json={"force": args.force})
    return finish_op(args, op, f"stop {args.name}")


def cmd_vm_delete(client: ApiClient, args: argparse.Namespace) -> int:
    """``vm delete``: stop and delete a VM."""
    return finish_op(
        args, client.request("DELETE", f"/vms/{args.name}", params=_wait_args(args)), f"delete {args.name}"
    )
