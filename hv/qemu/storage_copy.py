"""The storage copy of a live migration, source side: block mirrors of the local overlays.

With ``policy.copy_storage`` each local overlay is mirrored (``blockdev-mirror sync=top``) to the
destination's NBD export before memory is sent; at the switchover the ready mirrors are completed
(a soft ``block-job-cancel`` copies what is left), and on a rollback they are dropped. The URI and
naming rules are in :mod:`hv.qemu.migration`; the destination's exports are in
:mod:`hv.qemu.migration_destination`.

Every function takes the VM's name (for messages) and its QMP session. Imports: :mod:`hv.driver`
(errors), :mod:`hv.qemu.command_line` (node names), :mod:`hv.qemu.migration`, :mod:`hv.qemu.qmp`
and :mod:`protocols` only.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from hv.driver import EngineError
from hv.qemu import command_line, migration
from hv.qemu.qmp import QmpSession, poll
from protocols.migration import MigrationPolicy
from protocols.vmspec import DiskSpec

__all__ = ["complete_mirrors", "drop_mirrors", "mirror_disks", "mirror_jobs"]


async def mirror_disks(
    vm: str,
    qmp: QmpSession,
    target: migration.MigrationUri,
    copied: Sequence[DiskSpec],
    policy: MigrationPolicy,
) -> None:
    """Mirror each local overlay to the destination's export and wait until all are ready.

    A mirror still running from an earlier call (an agent restarted meanwhile) is kept; the
    remains of one that ended are removed first.

    Raises:
        EngineError: QEMU refused, a mirror failed, or no disk byte moved for ``policy.no_progress_s``.
    """
    jobs = {j["id"]: j for j in await mirror_jobs(qmp)}
    if any(j.get("status") == "concluded" for j in jobs.values()):
        await drop_mirrors(vm, qmp)
        jobs = {}
    nodes = await _nbd_nodes(qmp)
    try:
        for disk in copied:
            if migration.JOB_PREFIX + disk.target not in jobs:
                await _start_mirror(qmp, target, disk, nodes)
        await _wait_mirrors_ready(vm, qmp, [migration.JOB_PREFIX + d.target for d in copied], policy)
    except BaseException:
        with contextlib.suppress(EngineError):
            await asyncio.shield(drop_mirrors(vm, qmp))
        raise


async def _start_mirror(
    qmp: QmpSession, target: migration.MigrationUri, disk: DiskSpec, nodes: set[str]
) -> None:
    job, node = migration.JOB_PREFIX + disk.target, migration.NBD_NODE_PREFIX + disk.target
    if node not in nodes:
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": node,
                "server": {"type": "inet", "host": target.nbd_host, "port": str(target.nbd_port)},
                "export": disk.target,
            },
        )
    await qmp.execute(
        "blockdev-mirror",
        {
            "job-id": job,
            "device": command_line.top_node_name(disk.target),
            "target": node,
            "sync": "top",
            "auto-dismiss": False,
        },
    )


async def _wait_mirrors_ready(vm: str, qmp: QmpSession, ids: Sequence[str], policy: MigrationPolicy) -> None:
    moved_at, copied_so_far = time.monotonic(), -1
    while True:
        jobs = {j["id"]: j for j in await mirror_jobs(qmp)}
        for job_id in ids:
            job = jobs.get(job_id)
            if job is None or job.get("status") == "concluded":
                why = (job or {}).get("error") or "the job ended early"
                raise EngineError(
                    f"vm {vm!r}: copying disk {job_id.removeprefix(migration.JOB_PREFIX)} to the "
                    f"destination failed: {why}; the migration did not start and the VM runs here; "
                    "check the destination (is it still waiting?) and migrate again"
                )
        if all(jobs[j].get("status") == "ready" for j in ids):
            return
        progress = sum(int(jobs[j].get("current-progress", 0)) for j in ids)
        now = time.monotonic()
        if progress != copied_so_far:
            moved_at, copied_so_far = now, progress
        elif now - moved_at >= policy.no_progress_s:
            raise EngineError(
                f"vm {vm!r}: no disk data moved to the destination for {policy.no_progress_s:g}s "
                "while copying its disks; the link or the destination is down; the migration did not "
                "start and the VM runs here"
            )
        await asyncio.sleep(0.1)


async def mirror_jobs(qmp: QmpSession) -> builtins.list[dict[str, Any]]:
    """The migration's block jobs (``query-jobs``, by :data:`~hv.qemu.migration.JOB_PREFIX`)."""
    result = await qmp.execute("query-jobs")
    return [
        j
        for j in (result if isinstance(result, builtins.list) else [])
        if isinstance(j, dict) and str(j.get("id", "")).startswith(migration.JOB_PREFIX)
    ]


async def _nbd_nodes(qmp: QmpSession) -> set[str]:
    result = await qmp.execute("query-named-block-nodes", {"flat": True})
    return {
        str(n.get("node-name"))
        for n in (result if isinstance(result, builtins.list) else [])
        if isinstance(n, dict) and str(n.get("node-name", "")).startswith(migration.NBD_NODE_PREFIX)
    }


async def drop_mirrors(vm: str, qmp: QmpSession) -> None:
    """Cancel the storage mirrors at once and remove them and their NBD connections.

    Raises:
        EngineError: QEMU does not answer, or the mirrors do not stop in time.
    """
    for job in await mirror_jobs(qmp):
        if job.get("status") != "concluded":
            with contextlib.suppress(EngineError):  # it concluded meanwhile
                await qmp.execute("block-job-cancel", {"device": job["id"], "force": True})
    jobs = await poll(
        vm,
        lambda: mirror_jobs(qmp),
        lambda js: all(j.get("status") == "concluded" for j in js),
        "its storage mirrors to stop",
    )
    await _remove_mirrors(qmp, jobs)


async def complete_mirrors(vm: str, qmp: QmpSession) -> builtins.list[str]:
    """At the switchover: complete each ready mirror (a soft cancel copies what is left, then ends
    without error) and remove them; returns the failures (``target: error``), empty when all copied.

    Raises:
        EngineError: QEMU refused or does not answer, or the mirrors do not end in time.
    """
    for job in await mirror_jobs(qmp):
        if job.get("status") != "concluded":
            await qmp.execute("block-job-cancel", {"device": job["id"]})
    jobs = await poll(
        vm,
        lambda: mirror_jobs(qmp),
        lambda js: all(j.get("status") == "concluded" for j in js),
        "its storage mirrors to copy their last writes",
    )
    failed = [f"{j['id'].removeprefix(migration.JOB_PREFIX)}: {j['error']}" for j in jobs if j.get("error")]
    await _remove_mirrors(qmp, jobs)
    return failed


async def _remove_mirrors(qmp: QmpSession, jobs: Sequence[Mapping[str, Any]]) -> None:
    for job in jobs:
        with contextlib.suppress(EngineError):
            await qmp.execute("job-dismiss", {"id": job["id"]})
    for node in await _nbd_nodes(qmp):
        with contextlib.suppress(EngineError):
            await qmp.execute("blockdev-del", {"node-name": node})
