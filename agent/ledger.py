"""The agent's operation ledger: every command id it has applied, and the reply it gave.

This is what makes commands idempotent (DESIGN invariant 4). A retried command, a command the
broker redelivers after a reconnect, or one the controller re-sends after its own restart, finds its
id here and gets the original reply again instead of being applied twice. The ledger is a real
SQLite file in the agent's state directory, so it survives an agent restart too; without a state
directory it lives in memory.
"""

from __future__ import annotations

import pathlib
import sqlite3
import time

import msgspec

from protocols import codec
from protocols.messages import Reply

_decoder = msgspec.msgpack.Decoder(Reply)


class OpLedger:
    """Completed operations by id, pruned to the newest ``keep`` entries."""

    def __init__(self, path: pathlib.Path | None, keep: int = 10_000) -> None:
        self.keep = keep
        self._db = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS ops (op_id TEXT PRIMARY KEY, ts REAL NOT NULL, reply BLOB NOT NULL)"
        )
        self._writes = 0

    def get(self, op_id: str) -> Reply | None:
        row = self._db.execute("SELECT reply FROM ops WHERE op_id = ?", (op_id,)).fetchone()
        return None if row is None else _decoder.decode(row[0])

    def record(self, reply: Reply) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO ops (op_id, ts, reply) VALUES (?, ?, ?)",
            (reply.op_id, time.time(), codec.encode(reply)),
        )
        self._writes += 1
        if self._writes % 500 == 0:
            self._db.execute(
                "DELETE FROM ops WHERE op_id NOT IN (SELECT op_id FROM ops ORDER BY ts DESC LIMIT ?)",
                (self.keep,),
            )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM ops").fetchone()[0])

    def close(self) -> None:
        self._db.close()
