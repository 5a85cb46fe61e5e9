"""API bearer tokens with roles, and the audit log of every mutating request.

Roles are ordered: ``viewer`` may read, ``operator`` may also change VMs, ``admin`` may also manage
tokens and read the audit log. Tokens are random strings shown once at creation; the store keeps only
their SHA-256, so a copy of the database does not leak them, and neither do the logs: nothing here
ever logs a token or an Authorization header.

With auth off (the default for a loopback-only controller and the demo) every caller is the
``anonymous`` admin, but mutating requests are still audited.

The audit log is bounded: paths and details are cut to :data:`AUDIT_FIELD_MAX` characters, refused
requests without a valid token are recorded one by one only up to :data:`UNAUTHENTICATED_PER_MINUTE`
a minute (the rest become one summary row and a log line), and ``controller.state.retention`` prunes
old rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import secrets
import sqlite3
import time

import msgspec

from protocols.rest import AuditRecord, NewToken, Role, TokenInfo

log = logging.getLogger(__name__)

#: The longest path or detail an audit row keeps; longer ones are cut and marked.
AUDIT_FIELD_MAX = 256
#: Refused unauthenticated requests recorded one by one per minute; the rest are only counted.
UNAUTHENTICATED_PER_MINUTE = 60

ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"""


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Caller(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: Role


ANONYMOUS = Caller(name="anonymous", role="admin")
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def has_role(caller: Caller, needed: Role) -> bool:
    return _RANK[caller.role] >= _RANK[needed]


class Authority:
    """Tokens and audit records, in the controller's SQLite file."""

    def __init__(self, db: sqlite3.Connection, *, enabled: bool) -> None:
        self._db = db
        self.enabled = enabled
        self._db.executescript(_SCHEMA)
        #: The current minute of unauthenticated refusals: its start, rows written, rows left out.
        self._window = (0.0, 0, 0)

    # -- tokens ---------------------------------------------------------------------------------

    def create_token(self, name: str, role: Role) -> NewToken:
        """Create a token; the secret is returned once.

        Raises:
            AuthError: 400 for a bad name or role, 409 if the name is taken.
        """
        if not name or len(name) > 64 or not set(name) <= _NAME_OK:
            raise AuthError(
                400, "invalid_body", f"token name {name!r} is invalid: use 1-64 letters, digits, '-_.@'"
            )
        if role not in ROLES:
            raise AuthError(400, "invalid_body", f"role {role!r} is unknown; use one of {', '.join(ROLES)}")
        token = "fvt_" + secrets.token_urlsafe(32)
        try:
            self._db.execute(
                "INSERT INTO api_tokens (name, role, token_sha256, created_at) VALUES (?, ?, ?, ?)",
                (name, role, _digest(token), time.time()),
            )
        except sqlite3.IntegrityError:
            raise AuthError(
                409, "token_exists", f"a token named {name!r} exists; revoke it first or pick another name"
            ) from None
        return NewToken(name=name, role=role, token=token)

    def revoke(self, name: str) -> None:
        """Raises AuthError 404 when no such token exists."""
        cur = self._db.execute("DELETE FROM api_tokens WHERE name=?", (name,))
        if cur.rowcount == 0:
            raise AuthError(
                404, "unknown_token", f"no token named {name!r}; list them with `fleetvisor token list`"
            )

    def tokens(self) -> list[TokenInfo]:
        rows = self._db.execute("SELECT name, role, created_at FROM api_tokens ORDER BY name")
        return [TokenInfo(name=r[0], role=r[1], created_at=r[2]) for r in rows]

    def ensure_admin_token(self, path: pathlib.Path) -> pathlib.Path | None:
        """With auth on and no admin token yet, create one and write it to ``path`` (mode 0600)."""
        if not self.enabled or any(t.role == "admin" for t in self.tokens()):
            return None
        new = (
            self.create_token("admin", "admin") if not any(t.name == "admin" for t in self.tokens()) else None
        )
        if new is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new.token + "\n")
        return path

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller behind an Authorization header.

        Raises:
            AuthError: 401 when auth is on and the header is missing, malformed or unknown.
        """
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise AuthError(
                401,
                "unauthenticated",
                "this controller requires a token: pass --token or set FLEETVISOR_TOKEN "
                "(an admin creates one with `fleetvisor token create NAME --role ROLE`)",
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "unauthenticated", "the Authorization header must read 'Bearer <token>'")
        row = self._db.execute(
            "SELECT name, role FROM api_tokens WHERE token_sha256=?", (_digest(token.strip()),)
        ).fetchone()
        if row is None:
            raise AuthError(
                401, "unauthenticated", "the token is unknown or revoked; ask an admin for a new one"
            )
        return Caller(name=row[0], role=row[1])

    @staticmethod
    def authorize(caller: Caller, needed: Role, what: str) -> None:
        """Raises AuthError 403 when ``caller`` lacks ``needed``."""
        if not has_role(caller, needed):
            raise AuthError(
                403,
                "forbidden",
                f"{what} needs the {needed} role; token {caller.name!r} has {caller.role}",
            )

    # -- audit ----------------------------------------------------------------------------------

    def audit(self, caller: Caller | None, method: str, path: str, status: int, detail: str = "") -> None:
        """Record a mutating request; ``caller`` None is one refused before it had a valid token."""
        now = time.time()
        if caller is None and not self._admit_unauthenticated(now):
            return
        self._insert(now, caller, method, _cut(path), status, _cut(detail))

    def _admit_unauthenticated(self, now: float) -> bool:
        """Whether this minute still has room for one more unauthenticated row (see the docstring)."""
        start, written, left_out = self._window
        if now - start >= 60.0:
            if left_out:
                self._insert(
                    now, None, "-", "", 401,
                    f"{left_out} more unauthenticated requests were refused in the minute after "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(start))} UTC; not recorded one by one",
                )  # fmt: skip
            start, written, left_out = now, 0, 0
        if written >= UNAUTHENTICATED_PER_MINUTE:
            if left_out == 0:
                log.warning(
                    "audit: over %d unauthenticated requests refused this minute; the rest are only "
                    "counted (one summary row follows)",
                    UNAUTHENTICATED_PER_MINUTE,
                )
            self._window = (start, written, left_out + 1)
            return False
        self._window = (start, written + 1, left_out)
        return True

    def _insert(
        self, ts: float, caller: Caller | None, method: str, path: str, status: int, detail: str
    ) -> None:
        self._db.execute(
            "INSERT INTO audit (ts, actor, role, method, path, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                ts,
                caller.name if caller else "unauthenticated",
                caller.role if caller else "",
                method,
                path,
                status,
                detail,
            ),
        )

    def audit_since(self, seq: int, limit: int = 1000) -> list[AuditRecord]:
        rows = self._db.execute(
            "SELECT seq, ts, actor, role, method, path, status, detail FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [
            AuditRecord(
                seq=r[0], ts=r[1], actor=r[2], role=r[3], method=r[4], path=r[5], status=r[6], detail=r[7]
            )
            for r in rows
        ]


def _cut(text: str) -> str:
    """``text`` cut to :data:`AUDIT_FIELD_MAX` characters, marked when it was longer."""
    if len(text) <= AUDIT_FIELD_MAX:
        return text
    return f"{text[: AUDIT_FIELD_MAX - 30]}... ({len(text)} characters)"


def required_role(method: str, path: str) -> Role | None:
    """The role a request needs; None for the open endpoints (health, OpenAPI, docs)."""
    if path in ("/api/v1/health", "/api/v1/openapi.json") or path.startswith("/api/v1/docs"):
        return None
    if path.startswith(("/api/v1/tokens", "/api/v1/audit")):
        return "admin"
    # Telling the controller a host is off for sure, or gone for good, overrides what it can check;
    # accepting a host lets it into the fleet.
    if path.startswith("/api/v1/hosts/") and (
        path.endswith(("/confirm-down", "/accept")) or (method == "DELETE" and path.count("/") == 4)
    ):
        return "admin"
    if method in ("GET", "HEAD", "OPTIONS"):
        return "viewer"
    return "operator"
