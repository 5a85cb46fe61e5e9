"""Chaos: kill agents, the controller, the broker and QEMU at random while creates, deletes, live
migrations and evacuations run; then check the invariants against ground truth.

The machinery lives in :mod:`tests.support.chaos` (shared with ``bench/chaos``); the ground truth
(the sim engines' state files, the qemu engine's VM directories and the QEMU processes in /proc,
and the store's SQLite file) in :mod:`tests.support.ground_truth`. Afterwards every VM must exist
exactly once, on the host and in the state the store records; no operation may still run; every
migration and evacuation must have ended with its VMs where its outcome says. Every kind of victim
is hit at least once.

The run is bounded: ``FV_CHAOS_SECONDS`` (default 25) of chaos, then up to 60 s to settle. The seed
is printed first; ``FV_CHAOS_SEED=<n>`` replays a run. Run it longer by hand, e.g.
``FV_CHAOS_SECONDS=600 ./scripts/test tests/chaos``, or use ``./scripts/bench chaos``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.chaos import KINDS, ChaosRun, ChaosSettings, seed_from_env
from tests.support.qemu import build_guests, qemu_skip_reason

SECONDS = float(os.environ.get("FV_CHAOS_SECONDS", "25"))
SEED = seed_from_env()


@pytest.mark.timeout(SECONDS + 180)
def test_random_kills_never_lose_or_duplicate_a_vm_and_leave_no_operation_stuck(
    mosquitto_factory: Any, tmp_path: Path
) -> None:
    """Kill -9 every kind of victim under load; the hosts' ground truth then matches the store."""
    reason = qemu_skip_reason()
    if reason:
        pytest.skip(f"chaos kills QEMU too: {reason}")
    guests = build_guests()
    if isinstance(guests, str):
        pytest.skip(f"chaos kills QEMU too: {guests}")
    broker = mosquitto_factory(persistence=True)
    with ChaosRun(
        ChaosSettings(seconds=SECONDS, seed=SEED), tmp_path, broker, guests.tiny, echo=print
    ) as run:
        report = run.run()
        logs = run.log_tails()
    context = report.context()

    assert report.kinds_hit == list(KINDS), (
        f"not every kind of victim was hit: {dict(report.kills)} ({context})"
    )
    assert sum(report.kills.values()) >= SECONDS / 3 - 1, f"chaos must actually have happened ({context})"
    assert report.problems() == [], f"{context}\n" + "\n".join(report.problems()) + f"\n{logs}"
    assert report.migrations, f"the workload must have started migrations ({context})"
    assert report.evacuations, f"the workload must have started an evacuation ({context})"
    ended = Counter(report.ops[op_id].state for op_id in report.migrations)
    assert ended["running"] == 0 and ended["succeeded"] > 0, f"migrations ended {dict(ended)} ({context})"
    assert all(report.ops[op_id].state != "running" for op_id in report.evacuations), context
    assert report.verdict.moves_checked > 0, f"no VM's place was checked against its migration ({context})"
