"""``fleetvisor vm create|list|show|start|stop|pause|resume|reboot|delete|dumpxml``.

Migration is in ``controller.cli.migrate``; the create body is built by ``controller.cli.spec``. It
imports ``protocols`` and ``controller.cli`` modules, nothing else of ours.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from controller.cli import bulk
from controller.cli.exits import EXIT_FAILED, CliError
from controller.cli.render import emit, finish_op, gib, pct, print_json, render_explanation, table
from controller.cli.spec import build_spec
from controller.client import ApiError, Client
from protocols import rest
from protocols.text import printable


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


def _wait(args: argparse.Namespace) -> float:
    return 0.0 if args.no_wait else float(args.timeout)


def cmd_vm_create(client: Client, args: argparse.Namespace) -> int:
    """``vm create``: place and create one VM or ``--count`` of them, or only show where (``--dry-run``)."""
    body = build_spec(args)
    if args.dry_run:
        try:
            plan = client.vms.plan(body)
        except ApiError as exc:
            raise CliError(f"dry run: {exc}") from None
        if args.json:
            print_json(plan)
            return 0
        batch = isinstance(plan, rest.BatchPlanResponse)
        for one in plan.vms if isinstance(plan, rest.BatchPlanResponse) else [plan]:
            print(printable(f"vm {one.vm} would go to {one.host_id} (nothing was claimed)"))
            if args.explain or not batch:
                print(render_explanation(one.explanation))
        return 0
    result = client.vms.create(body, start=not args.no_start, explain=args.explain, wait=_wait(args))
    if isinstance(result, rest.CreateBatchResponse):
        return _finish_batch(args, result)
    op, vm = result.operation, result.vm
    if args.json:
        print_json(result)
        return EXIT_FAILED if op.state == "failed" else 0
    if op.state == "failed":
        print(printable(f"vm {body['name']}: create failed: {op.error}"), file=sys.stderr)
        return EXIT_FAILED
    state = "created" if op.state == "succeeded" else "creating"
    print(printable(f"vm {vm.name}: {state} on {vm.host_id} (state {vm.state}, operation {op.op_id})"))
    if result.explanation is not None:
        print(render_explanation(result.explanation))
    return 0


def _finish_batch(args: argparse.Namespace, result: rest.CreateBatchResponse) -> int:
    if args.json:
        print_json(result)
    else:
        rows = [[r.vm.name, r.vm.host_id or "-", r.operation.state] for r in result.vms]
        print(table(rows, ["vm", "host", "operation"]))
        for r in result.vms:
            if r.explanation is not None:
                print(printable(f"\n{r.vm.name}:"))
                print(render_explanation(r.explanation))
    return EXIT_FAILED if any(r.operation.state == "failed" for r in result.vms) else 0


def cmd_vm_list(client: Client, args: argparse.Namespace) -> int:
    """``vm list``: every VM, or those ``-l`` picks, or those on ``--host``."""
    emit(args, client.vms.list(args.selector or "", host=args.host or None), _render_vms)
    return 0


def cmd_vm_show(client: Client, args: argparse.Namespace) -> int:
    """``vm show``: one VM's spec, state, host and load."""
    emit(args, client.vms.get(args.name), _render_vm)
    return 0


def cmd_vm_dumpxml(client: Client, args: argparse.Namespace) -> int:
    """``vm dumpxml``: a VM's spec as libvirt domain XML; raises ``CliError`` if it has no XML form."""
    from protocols import domxml  # only this command needs it (40 ms of imports every command would pay)

    vm = client.vms.get(args.name)
    try:
        print(domxml.spec_to_xml(vm.spec), end="")
    except domxml.DomainXmlError as exc:
        raise CliError(f"vm {args.name!r} cannot be written as libvirt XML: {exc}") from None
    return 0


def cmd_vm_label(client: Client, args: argparse.Namespace) -> int:
    """``vm label (NAME | -l SELECTOR) KEY=VALUE|KEY- ...``: set or remove a VM's labels, or those of
    every VM that matches (one bulk action).
    """
    labels = bulk.label_changes("vm", args)
    if args.selector:
        body = rest.BulkRequest(
            action="label", kind="vm", selector=args.selector, labels=labels, max_parallel=args.max_parallel
        )
        return bulk.run_bulk(client, args, body, dry_run=args.dry_run)
    name = args.words[0]
    vm = client.vms.update(name, labels=labels)
    if args.json:
        print_json(vm)
    else:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(vm.spec.labels.items())) or "none"
        print(printable(f"vm {name}: labels {shown}"))
    return 0


def cmd_vm_start(client: Client, args: argparse.Namespace) -> int:
    """``vm start``: start a stopped VM."""
    return finish_op(args, client.vms.start(args.name, wait=_wait(args)), f"start {args.name}")


def cmd_vm_action(action: str) -> Callable[[Client, argparse.Namespace], int]:
    """The handler of ``vm <action>`` for a plain operation (pause, resume, reboot)."""

    def run(client: Client, args: argparse.Namespace) -> int:
        act = {"pause": client.vms.pause, "resume": client.vms.resume, "reboot": client.vms.reboot}[action]
        return finish_op(args, act(args.name, wait=_wait(args)), f"{action} {args.name}")

    return run


def cmd_vm_stop(client: Client, args: argparse.Namespace) -> int:
    """``vm stop [--force]``: ACPI shutdown, or power off at once."""
    op = client.vms.stop(args.name, force=args.force, wait=_wait(args))
    return finish_op(args, op, f"stop {args.name}")


def cmd_vm_delete(client: Client, args: argparse.Namespace) -> int:
    """``vm delete``: stop and delete a VM."""
    return finish_op(args, client.vms.delete(args.name, wait=_wait(args)), f"delete {args.name}")
