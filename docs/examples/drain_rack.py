#!/usr/bin/env python3
"""Drain a rack: every host a selector picks goes into maintenance, then its VMs move elsewhere.

    python docs/examples/drain_rack.py rack=3 [--bandwidth 512] [--dry-run]

All the rack's hosts are flagged first, so no VM moves from one host of the rack onto another; then
each host is evacuated in turn, with a progress line, and the script stops at the first host whose
evacuation fails (that host stays in maintenance; the hosts after it are left flagged, so undo with
``fleetvisor host maintenance -l SELECTOR off --no-evacuate``). Exit status 0 when the rack is
empty. It uses the blocking client; FLEETVISOR_URL and FLEETVISOR_TOKEN say where and who.
"""

from __future__ import annotations

import argparse
import sys

from controller.client import ApiError, Client
from protocols.migration import MigrationPolicy
from protocols.rest import BulkRequest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("selector", help="the rack's hosts, e.g. rack=3")
    parser.add_argument("--bandwidth", type=float, default=1024.0, help="MiB/s per migration")
    parser.add_argument("--dry-run", action="store_true", help="say which hosts and VMs; change nothing")
    args = parser.parse_args()
    with Client.from_env() as fv:
        try:
            return drain(fv, args.selector, MigrationPolicy(bandwidth_mib_s=args.bandwidth), args.dry_run)
        except ApiError as exc:  # the controller's own words: what, why, and how to fix it
            print(f"drain {args.selector}: {exc}", file=sys.stderr)
            return 1


def drain(fv: Client, selector: str, policy: MigrationPolicy, dry_run: bool) -> int:
    hosts = fv.hosts.list(selector)
    if not hosts:
        print(f"no host matches {selector!r}", file=sys.stderr)
        return 1
    for host in hosts:
        print(f"{host.host_id}: {host.vms} VM(s)")
    if dry_run:
        return 0
    flag = fv.actions.start(BulkRequest(action="maintenance", selector=selector, on=True, max_parallel=10))
    flagged = fv.operations.wait(flag.op_id)
    if flagged.state != "succeeded":
        print(f"could not flag every host: {flagged.error}", file=sys.stderr)
        return 1
    for host in hosts:
        op = fv.hosts.evacuate(host.host_id, policy=policy)
        for now in fv.operations.follow(op.op_id, interval=1.0):
            results = now.params.get("results", {})
            print(f"\r{host.host_id}: {len(results)}/{len(now.params.get('vms', []))} VM(s) moved", end="")
        print()
        if now.state != "succeeded":
            print(f"{host.host_id}: evacuation {now.state}: {now.error}", file=sys.stderr)
            return 1
    left = sum(h.vms for h in fv.hosts.list(selector))
    print(f"{selector}: drained ({len(hosts)} host(s) in maintenance, {left} VM(s) left)")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
