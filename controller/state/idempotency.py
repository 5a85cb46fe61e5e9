"""Stored answers to requests sent with an ``Idempotency-Key``, so a retried request gets the first
answer instead of doing the work twice.

One row per (scope, key): the scope is the caller (each token has its own keys), the request's hash
(method, path, query and body), and the response that was sent. Rows are kept :data:`KEEP_S` (24 h);
the store's retention task (:mod:`controller.state.retention`) prunes older ones. The table lives in
the store's file, on its connection.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    status INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created_at);
"""

#: How long an answer is kept (at least a day, as clients retry across restarts and outages).
KEEP_S = 86400.0


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    request_sha256: str
    status: int
    content_type: str
    body: bytes
    created_at: float


class IdempotencyStore:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        with self._db:
            self._db.executescript(_SCHEMA)

    def get(self, scope: str, key: str) -> StoredAnswer | None:
        """The answer kept for ``key`` (younger than :data:`KEEP_S`), or None."""
        row = self._db.execute(
            "SELECT request_sha256, status, content_type, body, created_at FROM idempotency "
            "WHERE scope=? AND key=? AND created_at>=?",
            (scope, key, time.time() - KEEP_S),
        ).fetchone()
        return None if row is None else StoredAnswer(row[0], row[1], row[2], bytes(row[3]), row[4])

    def put(self, scope: str, key: str, answer: StoredAnswer) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)",
                (scope, key, answer.request_sha256, answer.status, answer.content_type, answer.body,
                 answer.created_at),
            )  # fmt: skip
