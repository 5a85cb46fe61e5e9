"""Retention against real SQLite files: old events and audit rows go, the newest stay, and the
``events`` command and API still work on a pruned store.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

from controller.daemon import Controller, ControllerSettings
from controller.security.auth import Authority
from controller.state.retention import Retention, RetentionSettings
from controller.state.store import Store
from tests.support.fleet import FAST_BUS
from tests.support.processes import ROOT

_DAY = 86400.0


def _fill(db, table: str, old: int, recent: int, age_days: float) -> None:
    now = time.time()
    if table == "events":
        rows = [
            (now - age_days * _DAY if i < old else now, "test", f"event {i}") for i in range(old + recent)
        ]
        db.executemany("INSERT INTO events (ts, type, message) VALUES (?, ?, ?)", rows)
    else:
        rows = [(now - age_days * _DAY if i < old else now, f"/p/{i}") for i in range(old + recent)]
        db.executemany(
            "INSERT INTO audit (ts, actor, role, method, path, status) VALUES (?, 'a', 'admin', 'POST', ?, 200)",
            rows,
        )


async def test_pruning_keeps_the_newest_rows_within_age_and_cap(tmp_path, caplog):
    """5,000 events (2,000 of them 40 days old) and 700 audit rows (500 of them 100 days old), capped
    at 1,000 and 150: exactly the newest 1,000 and 150 stay, in batches, and each table's pruning is logged.
    """
    caplog.set_level(logging.INFO, logger="controller.state.retention")
    store = Store(tmp_path / "c.sqlite")
    try:
        db = store.connection
        Authority(db, enabled=False)
        _fill(db, "events", 2000, 3000, 40)
        _fill(db, "audit", 500, 200, 100)
        settings = RetentionSettings(events_max_rows=1000, audit_max_rows=150, batch=300)
        totals = await Retention(db, settings).prune()
        events = [r[0] for r in db.execute("SELECT message FROM events ORDER BY seq")]
        assert events == [f"event {i}" for i in range(4000, 5000)]
        paths = [r[0] for r in db.execute("SELECT path FROM audit ORDER BY seq")]
        assert paths == [f"/p/{i}" for i in range(550, 700)]
        assert totals["events"].total == 4000 and totals["events"].too_old >= 300
        assert totals["audit"].total == 550
        # What is left is within the limits: another round deletes nothing.
        assert all(p.total == 0 for p in (await Retention(db, settings).prune()).values())
        assert store.events_since(0)[-1].message == "event 4999"
    finally:
        store.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "retention: pruned 4000 events rows (" in text and "beyond the 1000-row cap" in text
    assert "retention: pruned 550 audit rows (" in text and "older than 90 days" in text


async def test_the_controller_prunes_at_start_and_fleetvisor_events_still_works(mosquitto, tmp_path):
    """A controller started on a store of 50 old events keeps 5, and `fleetvisor events` lists them."""
    store = Store(tmp_path / "c.sqlite")
    for i in range(50):
        store.append_event("test", f"event {i}")
    store.close()
    settings = ControllerSettings(
        broker_url=mosquitto.url,
        db_path=tmp_path / "c.sqlite",
        api_port=0,
        retention=RetentionSettings(events_max_rows=5),
        bus_overrides=FAST_BUS,
    )
    async with Controller(settings) as controller:
        for _ in range(100):
            if controller.store.connection.execute("SELECT COUNT(*) FROM events").fetchone()[0] <= 5:
                break
            await asyncio.sleep(0.05)
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "fleetvisor", "events", "--url", controller.api_url],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "event 49" in done.stdout and "event 44" not in done.stdout


def test_idempotency_answers_older_than_a_day_are_pruned_and_newer_ones_kept(tmp_path):
    """The retention task prunes the kept answers of idempotent requests by age, on a real SQLite file."""
    from controller.state.idempotency import KEEP_S, IdempotencyStore, StoredAnswer

    store = Store(tmp_path / "c.sqlite")
    answers = IdempotencyStore(store.connection)
    now = time.time()
    for key, age in (("old", KEEP_S + 60), ("new", 60.0)):
        answers.put("ops", key, StoredAnswer("h", 200, "application/json", b"{}", now - age))
    retention = Retention(store.connection, RetentionSettings())
    assert retention.prune_idempotency(now) == 1
    assert answers.get("ops", "old") is None and answers.get("ops", "new") is not None
    store.close()
