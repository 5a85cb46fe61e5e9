"""The enrolment tables of the store: which host ids are accepted or pending, and join tokens.

A host id is ``pending`` until an operator accepts it or it presents a one-time join token; an
``accepted`` row keeps the capacity the host had when it was accepted, to judge what it claims
later. A host in ``hosts`` without a row here was known before enrolment existed: it counts as
accepted. Join tokens are kept as SHA-256 digests, so the file never holds one that works.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from controller.state.store import Store

EnrolmentState = Literal["pending", "accepted"]


@dataclass(frozen=True, slots=True)
class EnrolmentRecord:
    host_id: str
    state: EnrolmentState
    boot_id: str
    address: str
    cores: int
    memory_mib: int
    reason: str
    first_seen: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A join token as created: ``token`` is shown once and never stored."""

    token: str
    host_id: str
    expires_at: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class EnrolmentTable:
    """Reads and writes the ``enrolment`` and ``join_tokens`` tables of ``store``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, host_id: str) -> EnrolmentRecord | None:
        row = self.store.connection.execute(
            "SELECT host_id, state, boot_id, address, cores, memory_mib, reason, first_seen, updated_at "
            "FROM enrolment WHERE host_id=?",
            (host_id,),
        ).fetchone()
        return None if row is None else EnrolmentRecord(*row)

    def pending(self) -> list[EnrolmentRecord]:
        rows = self.store.connection.execute(
            "SELECT host_id, state, boot_id, address, cores, memory_mib, reason, first_seen, updated_at "
            "FROM enrolment WHERE state='pending' ORDER BY host_id"
        )
        return [EnrolmentRecord(*row) for row in rows]

    def put(
        self,
        host_id: str,
        state: EnrolmentState,
        *,
        boot_id: str,
        address: str,
        cores: int,
        memory_mib: int,
        reason: str,
    ) -> None:
        now = time.time()
        self.store.connection.execute(
            """INSERT INTO enrolment (host_id, state, boot_id, address, cores, memory_mib, reason,
                   first_seen, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(host_id) DO UPDATE SET state=excluded.state, boot_id=excluded.boot_id,
                   address=excluded.address, cores=excluded.cores, memory_mib=excluded.memory_mib,
                   reason=excluded.reason, updated_at=excluded.updated_at""",
            (host_id, state, boot_id, address, cores, memory_mib, reason, now, now),
        )

    def delete(self, host_id: str) -> None:
        self.store.connection.execute("DELETE FROM enrolment WHERE host_id=?", (host_id,))

    def create_token(self, host_id: str, ttl_s: float) -> JoinToken:
        """A new join token, valid for ``ttl_s`` seconds (for ``host_id`` only, unless empty)."""
        token = "fvj-" + secrets.token_urlsafe(24)
        now = time.time()
        db = self.store.connection
        db.execute("DELETE FROM join_tokens WHERE expires_at < ?", (now,))
        db.execute(
            "INSERT INTO join_tokens (token_hash, host_id, expires_at, created_at) VALUES (?, ?, ?, ?)",
            (_digest(token), host_id, now + ttl_s, now),
        )
        return JoinToken(token, host_id, now + ttl_s)

    def consume_token(self, token: str, host_id: str) -> str | None:
        """Spend ``token`` for ``host_id``. Returns None when it enrols the host, or why it does not."""
        db = self.store.connection
        row = db.execute(
            "SELECT host_id, expires_at FROM join_tokens WHERE token_hash=?", (_digest(token),)
        ).fetchone()
        if row is None:
            return "its join token is unknown or was used already"
        bound, expires_at = row
        if expires_at < time.time():
            db.execute("DELETE FROM join_tokens WHERE token_hash=?", (_digest(token),))
            return "its join token has expired"
        if bound and bound != host_id:
            return f"its join token is for host {bound!r}"
        db.execute("DELETE FROM join_tokens WHERE token_hash=?", (_digest(token),))
        return None
