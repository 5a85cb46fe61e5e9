#!/usr/bin/env python3
"""Stop every VM that carries a label, a few at a time, and report what did not stop.

    python docs/examples/stop_by_label.py tier=web [--max-parallel 5] [--stop-after 3] [--force] [--dry-run]

One bulk action does the work on the controller (``POST /actions``): it is persistent, so it goes
on if this script is killed and resumes after a controller restart. The script shows the targets
first, then the progress, then each VM that failed or was skipped with the reason. Exit status 0
when every target stopped. It uses the blocking client; FLEETVISOR_URL and FLEETVISOR_TOKEN say
where and who.
"""

from __future__ import annotations

import argparse
import sys

from controller.client import ApiError, Client
from protocols.rest import BulkRequest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("selector", help="which VMs, e.g. tier=web or 'tier=web,state=running'")
    parser.add_argument("--max-parallel", type=int, default=5)
    parser.add_argument("--stop-after", type=int, default=0, help="end after this many failures (0: never)")
    parser.add_argument("--force", action="store_true", help="power off at once instead of ACPI shutdown")
    parser.add_argument("--dry-run", action="store_true", help="list the VMs; stop nothing")
    args = parser.parse_args()
    request = BulkRequest(action="stop", selector=args.selector, max_parallel=args.max_parallel,
                          stop_after=args.stop_after, force=args.force)  # fmt: skip
    with Client.from_env() as fv:
        try:
            targets = fv.actions.plan(request).targets
            print(f"{len(targets)} VM(s): {', '.join(targets) or '-'}")
            if args.dry_run or not targets:
                return 0
            op = fv.actions.start(request)
            for now in fv.operations.follow(op.op_id, interval=1.0):
                results = now.params.get("results", {})
                print(f"\r{len(results)}/{len(targets)} settled", end="", flush=True)
            print()
        except ApiError as exc:  # a bad selector says which character, and why
            print(f"stop {args.selector}: {exc}", file=sys.stderr)
            return 1
    for vm, result in sorted(now.params.get("results", {}).items()):
        if not result.startswith("done"):
            print(f"  {vm}: {result}")
    print(now.error or f"all {len(targets)} stopped")
    return 0 if now.state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
