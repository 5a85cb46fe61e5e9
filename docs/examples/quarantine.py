#!/usr/bin/env python3
"""Follow the fleet's events and react: a host that drops offline is put in maintenance.

    python docs/examples/quarantine.py [--since SEQ]

A host that vanished (its agent crashed, its link went, it rebooted by itself) may come back by
itself a minute later and take new VMs again before anyone looked at it. This script follows the
live event stream and, on each ``host.offline``, flags the host in maintenance with a
``quarantine`` label saying when and why, so nothing new lands there until an operator clears it:
``fleetvisor host maintenance HOST off`` and ``fleetvisor host label HOST quarantine-``.

It uses the async client. The stream outlives a controller restart (it resumes after the last
event seen, so no event is missed or handled twice); Ctrl-C ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from controller.client import ApiError, AsyncClient
from protocols.rest import Event


async def follow(since: int | None) -> None:
    async with AsyncClient.from_env() as fv:
        async for event in fv.events.follow(since, notice=lambda text: print(text, file=sys.stderr)):
            if event.type == "host.offline" and event.host_id:
                await quarantine(fv, event)


async def quarantine(fv: AsyncClient, event: Event) -> None:
    when = time.strftime("%Y-%m-%dT%H.%M.%S", time.localtime(event.ts))
    try:
        host = await fv.hosts.update(
            event.host_id, maintenance=True, labels={"quarantine": f"offline-{when}"}
        )
    except ApiError as exc:  # e.g. the host was forgotten meanwhile: say so and go on
        print(f"event #{event.seq}: could not quarantine {event.host_id}: {exc}", file=sys.stderr)
        return
    print(f"event #{event.seq}: {event.message}; {host.host_id} quarantined (in maintenance)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", type=int, default=None, help="also handle stored events after this one")
    args = parser.parse_args()
    try:
        asyncio.run(follow(args.since))
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
