"""Retention: the event history and the audit log are pruned by age and by size, and the answers
kept for idempotent requests by age.

Both tables only grow otherwise, and a host (or a caller) that floods them would fill the disk. A task
of the controller runs :meth:`Retention.run`: every ``interval_s`` it deletes the rows older than the
age limit and the oldest rows beyond the row cap, in batches so the controller keeps answering while
it prunes, and logs how many rows went and why. The newest rows always stay. It works with SQL on the
store's connection; the audit table is there only once the API has started, and is skipped before.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass

from controller.state import idempotency

log = logging.getLogger(__name__)

_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """How long, and how many, events and audit rows are kept."""

    events_max_age_days: float = 30.0
    events_max_rows: int = 1_000_000
    audit_max_age_days: float = 90.0
    audit_max_rows: int = 1_000_000
    interval_s: float = 600.0
    #: Rows deleted per statement; between batches the event loop runs other work.
    batch: int = 20_000

    def problems(self) -> list[str]:
        """What is out of range, each naming its flag."""
        out = []
        for flag, value in (
            ("--events-max-age-days", self.events_max_age_days),
            ("--events-max-rows", self.events_max_rows),
            ("--audit-max-age-days", self.audit_max_age_days),
            ("--audit-max-rows", self.audit_max_rows),
        ):
            if value <= 0:
                out.append(f"{flag} must be above 0 (got {value})")
        return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The retention flags of ``fleetvisor controller``."""
    rs = RetentionSettings()
    for flag, type_, default, metavar, text in (
        ("--events-max-age-days", float, rs.events_max_age_days, "DAYS", "events older than this are pruned"),
        ("--events-max-rows", int, rs.events_max_rows, "N", "events kept at most; the oldest go first"),
        ("--audit-max-age-days", float, rs.audit_max_age_days, "DAYS", "audit rows older than this are pruned"),
        ("--audit-max-rows", int, rs.audit_max_rows, "N", "audit rows kept at most; the oldest go first"),
    ):  # fmt: skip
        p.add_argument(
            flag, type=type_, default=default, metavar=metavar, help=f"{text} (default %(default)s)"
        )


def settings_of(args: argparse.Namespace) -> RetentionSettings:
    """The settings of :func:`add_arguments`.

    Raises:
        ValueError: a limit is not above 0.
    """
    settings = RetentionSettings(
        events_max_age_days=args.events_max_age_days,
        events_max_rows=args.events_max_rows,
        audit_max_age_days=args.audit_max_age_days,
        audit_max_rows=args.audit_max_rows,
    )
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return settings


@dataclass(slots=True)
class Pruned:
    """Rows one table lost in one round, by reason."""

    too_old: int = 0
    over_cap: int = 0

    @property
    def total(self) -> int:
        return self.too_old + self.over_cap


class Retention:
    """Prunes the ``events`` and ``audit`` tables of one SQLite connection."""

    def __init__(self, db: sqlite3.Connection, settings: RetentionSettings) -> None:
        self._db = db
        self.settings = settings

    def _limits(self) -> tuple[tuple[str, float, int], ...]:
        s = self.settings
        return (
            ("events", s.events_max_age_days, s.events_max_rows),
            ("audit", s.audit_max_age_days, s.audit_max_rows),
        )

    def _exists(self, table: str) -> bool:
        row = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,))
        return row.fetchone() is not None

    def prune_batch(self, now: float | None = None) -> dict[str, Pruned]:
        """One batch per table and reason: what was deleted (nothing left to do when all are 0)."""
        now = time.time() if now is None else now
        out: dict[str, Pruned] = {}
        for table, max_age_days, max_rows in self._limits():
            if not self._exists(table):
                continue
            pruned = out[table] = Pruned()
            pruned.too_old = self._delete(table, "ts < ?", now - max_age_days * _DAY)
            row = self._db.execute(
                f"SELECT seq FROM {table} ORDER BY seq DESC LIMIT 1 OFFSET ?", (max_rows,)
            ).fetchone()
            if row is not None:
                pruned.over_cap = self._delete(table, "seq <= ?", row[0])
        return out

    def _delete(self, table: str, where: str, arg: float) -> int:
        cur = self._db.execute(
            f"DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} WHERE {where} ORDER BY seq LIMIT ?)",
            (arg, self.settings.batch),
        )
        return cur.rowcount

    async def prune(self, now: float | None = None) -> dict[str, Pruned]:
        """Prune until nothing is beyond the limits; log what went. Returns the totals per table."""
        totals: dict[str, Pruned] = {}
        while True:
            batch = self.prune_batch(now)
            for table, pruned in batch.items():
                total = totals.setdefault(table, Pruned())
                total.too_old += pruned.too_old
                total.over_cap += pruned.over_cap
            if not any(p.total for p in batch.values()):
                break
            await asyncio.sleep(0)
        for table, max_age_days, max_rows in self._limits():
            pruned = totals.get(table, Pruned())
            if pruned.total:
                log.info(
                    "retention: pruned %d %s rows (%d older than %g days, %d beyond the %d-row cap)",
                    pruned.total,
                    table,
                    pruned.too_old,
                    max_age_days,
                    pruned.over_cap,
                    max_rows,
                )
        return totals

    async def run(self) -> None:
        """Prune now and then every ``interval_s``, forever."""
        while True:
            await self.prune()
            self.prune_idempotency()
            await asyncio.sleep(self.settings.interval_s)

    def prune_idempotency(self, now: float | None = None) -> int:
        """Delete the kept answers of idempotent requests older than they are kept (the table is
        there once the API has started). Returns how many went.
        """
        if not self._exists("idempotency"):
            return 0
        now = time.time() if now is None else now
        gone = self._db.execute(
            "DELETE FROM idempotency WHERE created_at < ?", (now - idempotency.KEEP_S,)
        ).rowcount
        if gone:
            log.info(
                "retention: pruned %d idempotency answers older than %gh", gone, idempotency.KEEP_S / 3600
            )
        return gone
