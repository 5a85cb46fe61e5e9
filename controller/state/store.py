"""The controller's state: hosts, VMs, operations and events in one SQLite file (WAL).

The store is the controller's memory across restarts. Everything that must survive one lives
here: a VM's spec, its host (which is also its resource claim), the operation working on it, and
the event history. Calls are synchronous and short; the controller is one process, and each
mutating method is one transaction, so a crash leaves either the old or the new state, never half.

Rows are mapped to frozen msgspec Structs (the same types the API serves).
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from controller.state import files
from controller.state.files import StoreError
from controller.state.records import (
    HostEnergyRecord,
    HostRecord,
    OperationRecord,
    OpKind,
    OpState,
    Usage,
    VmRecord,
    VmState,
    encoder,
    energy_decoder,
    host_of,
    op_of,
    vm_of,
)
from controller.state.schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION
from protocols.messages import Capabilities
from protocols.rest import Event as EventRecord
from protocols.vmspec import VmSpec

__all__ = [
    "SCHEMA_VERSION",
    "EventRecord",
    "HostEnergyRecord",
    "HostRecord",
    "OpKind",
    "OpState",
    "OperationRecord",
    "Store",
    "StoreError",
    "Usage",
    "VmRecord",
    "VmState",
]


#: The bulk action whose services are creating operations now (see Store.parent).
_parent: ContextVar[str] = ContextVar("fleetvisor_operation_parent", default="")


class Store:
    """The SQLite-backed state store. One instance per controller process."""

    def __init__(self, path: pathlib.Path | str) -> None:
        """Open (or create) the store at ``path``, check it, lock it, and migrate it to this schema.

        Raises:
            StoreError: the file is damaged, in use by another controller, or of a newer schema.
        """
        self.path = str(path)
        # The lock is released when the store closes, or when it is collected unclosed.
        self._unlock: weakref.finalize[Any, Any] | None = None
        if self.path != ":memory:":
            pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            files.check_file(self.path)
            self._unlock = weakref.finalize(self, os.close, files.lock(self.path))
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        try:
            fresh = self.path == ":memory:" or not pathlib.Path(self.path).exists()
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            if fresh and self.path != ":memory:":
                files.make_private(self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open the state store {self.path!r}: {exc}; check the path and its permissions, or "
                f"restore a backup with `fleetvisor store restore BACKUP --db {self.path}`"
            ) from exc
        version = 1 if row is None else int(row[0])
        if row is None:
            self._db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
        if version > SCHEMA_VERSION or (version not in MIGRATIONS and version != SCHEMA_VERSION):
            raise StoreError(
                f"state store {self.path!r} has schema version {version}, this controller knows up to "
                f"{SCHEMA_VERSION}; use a controller of a matching or newer version"
            )
        while version < SCHEMA_VERSION:
            self._db.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, MIGRATIONS[version].split(";")):
                self._db.execute(statement)
            version += 1
            self._db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
            self._db.execute("COMMIT")

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection, for components that keep their own tables in this file."""
        return self._db

    def close(self) -> None:
        """Close the store and release its lock."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
        if self._unlock is not None:
            self._unlock()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- hosts ----------------------------------------------------------------------------------

    def upsert_host(
        self,
        *,
        host_id: str,
        online: bool,
        boot_id: str,
        address: str,
        agent_version: str,
        capabilities: Capabilities,
        reason: str,
        agent_labels: dict[str, str] | None = None,
    ) -> None:
        now = time.time()
        self._db.execute(
            """INSERT INTO hosts (host_id, online, boot_id, address, agent_version, capabilities,
                                  state_reason, first_seen, last_seen, agent_labels)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (host_id) DO UPDATE SET online=excluded.online, boot_id=excluded.boot_id,
                  address=excluded.address, agent_version=excluded.agent_version,
                  capabilities=excluded.capabilities, state_reason=excluded.state_reason,
                  last_seen=excluded.last_seen, agent_labels=excluded.agent_labels""",
            (
                host_id,
                int(online),
                boot_id,
                address,
                agent_version,
                encoder.encode(capabilities),
                reason,
                now,
                now,
                encoder.encode(agent_labels or {}),
            ),
        )

    def set_host_admin(
        self, host_id: str, *, maintenance: bool | None = None, operator_labels: dict[str, str] | None = None
    ) -> None:
        """Operator settings of a host: maintenance mode and labels."""
        if maintenance is not None:
            self._db.execute("UPDATE hosts SET maintenance=? WHERE host_id=?", (int(maintenance), host_id))
        if operator_labels is not None:
            self._db.execute(
                "UPDATE hosts SET operator_labels=? WHERE host_id=?",
                (encoder.encode(operator_labels), host_id),
            )

    def set_host_standby(self, host_id: str, since: float | None) -> None:
        """Record that the power manager put the host in standby at ``since`` (None: it is on again)."""
        self._db.execute("UPDATE hosts SET standby_since=? WHERE host_id=?", (since, host_id))

    def set_host_online(self, host_id: str, online: bool, reason: str) -> bool:
        """Record liveness; returns True when it changed."""
        cur = self._db.execute(
            "UPDATE hosts SET online=?, state_reason=?, last_seen=? WHERE host_id=? AND online<>?",
            (int(online), reason, time.time(), host_id, int(online)),
        )
        return cur.rowcount > 0

    def host(self, host_id: str) -> HostRecord | None:
        row = self._db.execute("SELECT * FROM hosts WHERE host_id=?", (host_id,)).fetchone()
        return None if row is None else host_of(row)

    def hosts(self) -> list[HostRecord]:
        return [host_of(r) for r in self._db.execute("SELECT * FROM hosts ORDER BY host_id")]

    def usage(self) -> dict[str, Usage]:
        """Claimed resources per host: every VM with a host holds its claim, whatever its power state,
        and a migrating VM holds one on its destination too.
        """
        rows = self._db.execute(
            """SELECT host, SUM(vcpus), SUM(memory_mib), SUM(disk_gib), COUNT(*) FROM (
                   SELECT host_id AS host, vcpus, memory_mib, disk_gib FROM vms WHERE host_id IS NOT NULL
                   UNION ALL
                   SELECT migrating_to, vcpus, memory_mib, disk_gib FROM vms WHERE migrating_to IS NOT NULL
               ) GROUP BY host"""
        )
        return {r[0]: Usage(vcpus=r[1], memory_mib=r[2], disk_gib=r[3], vms=r[4]) for r in rows}

    # -- VMs ------------------------------------------------------------------------------------

    def insert_vm(
        self,
        spec: VmSpec,
        host_id: str | None,
        state: VmState,
        op_id: str | None,
        hints: dict[str, Any] | None = None,
    ) -> VmRecord:
        """Record a VM (its host is its claim) with the placement rules it keeps for life."""
        now = time.time()
        record = VmRecord(
            name=spec.name,
            uuid=str(uuid.uuid4()),
            spec=spec,
            host_id=host_id,
            state=state,
            op_id=op_id,
            error="",
            created_at=now,
            updated_at=now,
            hints=hints or {},
        )
        self._db.execute(
            """INSERT INTO vms (name, uuid, spec, host_id, state, vcpus, memory_mib, disk_gib, op_id,
                                created_at, updated_at, hints) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                spec.name,
                record.uuid,
                encoder.encode(spec),
                host_id,
                state,
                spec.vcpus,
                spec.memory_mib,
                spec.disk_gib,
                op_id,
                now,
                now,
                encoder.encode(hints or {}),
            ),
        )
        return record

    def vm(self, name: str) -> VmRecord | None:
        row = self._db.execute("SELECT * FROM vms WHERE name=?", (name,)).fetchone()
        return None if row is None else vm_of(row)

    def vms(self, host_id: str | None = None) -> list[VmRecord]:
        if host_id is None:
            rows = self._db.execute("SELECT * FROM vms ORDER BY name")
        else:
            rows = self._db.execute("SELECT * FROM vms WHERE host_id=? ORDER BY name", (host_id,))
        return [vm_of(r) for r in rows]

    _KEEP: Any = object()

    def update_vm(
        self,
        name: str,
        *,
        state: VmState | None = None,
        host_id: Any = _KEEP,
        op_id: Any = _KEEP,
        error: str | None = None,
        migrating_to: Any = _KEEP,
    ) -> None:
        sets: list[str] = ["updated_at=?"]
        args: list[Any] = [time.time()]
        if state is not None:
            sets.append("state=?")
            args.append(state)
        if host_id is not Store._KEEP:
            sets.append("host_id=?")
            args.append(host_id)
        if op_id is not Store._KEEP:
            sets.append("op_id=?")
            args.append(op_id)
        if error is not None:
            sets.append("error=?")
            args.append(error)
        if migrating_to is not Store._KEEP:
            sets.append("migrating_to=?")
            args.append(migrating_to)
        args.append(name)
        self._db.execute(f"UPDATE vms SET {', '.join(sets)} WHERE name=?", args)

    def set_vm_spec(self, name: str, spec: VmSpec) -> None:
        """Replace a VM's spec (its labels change; its resources never do)."""
        self._db.execute(
            "UPDATE vms SET spec=?, updated_at=? WHERE name=?", (encoder.encode(spec), time.time(), name)
        )

    def delete_vm(self, name: str) -> None:
        self._db.execute("DELETE FROM vms WHERE name=?", (name,))

    # -- groups and fencing -----------------------------------------------------------------------

    def group_policy(self, name: str) -> str | None:
        """The policy group ``name`` was created with (None: no such group yet)."""
        row = self._db.execute("SELECT policy FROM groups WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def insert_group(self, name: str, policy: str) -> None:
        """Create group ``name`` with its one policy (call inside a transaction)."""
        self._db.execute(
            "INSERT INTO groups (name, policy, created_at) VALUES (?, ?, ?)", (name, policy, time.time())
        )

    def set_host_fenced(self, host_id: str, at: float | None, how: str = "") -> None:
        """Record that ``host_id`` was fenced at ``at`` and how (None: it is back, no longer fenced)."""
        self._db.execute("UPDATE hosts SET fenced_at=?, fenced_how=? WHERE host_id=?", (at, how, host_id))

    def delete_host(self, host_id: str) -> None:
        """Remove a host's record (``host forget``); its VMs' records are the caller's to settle."""
        self._db.execute("DELETE FROM hosts WHERE host_id=?", (host_id,))
        self._db.execute("DELETE FROM energy WHERE host_id=?", (host_id,))

    # -- operations -----------------------------------------------------------------------------

    def insert_operation(
        self, *, kind: OpKind, vm: str, host_id: str | None, params: dict[str, Any], deadline: float
    ) -> OperationRecord:
        now = time.time()
        op = OperationRecord(
            op_id=uuid.uuid4().hex,
            kind=kind,
            vm=vm,
            host_id=host_id,
            state="running",
            error="",
            params=params,
            deadline=deadline,
            created_at=now,
            updated_at=now,
            parent=_parent.get(),
        )
        self._db.execute(
            """INSERT INTO operations
               (op_id, kind, vm, host_id, state, params, deadline, created_at, updated_at, parent)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (op.op_id, kind, vm, host_id, "running", encoder.encode(params), deadline, now, now, op.parent),
        )
        return op

    @staticmethod
    @contextmanager
    def parent(op_id: str) -> Iterator[None]:
        """Operations inserted inside this block (in this task) are children of ``op_id``: the
        services a bulk action calls create their operations as they always do, and the bulk
        action finds them again with :meth:`children`, after a restart too.
        """
        token = _parent.set(op_id)
        try:
            yield
        finally:
            _parent.reset(token)

    def children(self, parent: str) -> list[OperationRecord]:
        """The operations started by bulk action ``parent``, oldest first."""
        rows = self._db.execute("SELECT * FROM operations WHERE parent=? ORDER BY created_at", (parent,))
        return [op_of(r) for r in rows]

    def finish_operation(self, op_id: str, state: OpState, error: str = "") -> None:
        self._db.execute(
            "UPDATE operations SET state=?, error=?, updated_at=? WHERE op_id=?",
            (state, error, time.time(), op_id),
        )

    def update_operation(self, op_id: str, params: dict[str, Any]) -> OperationRecord:
        """Replace an operation's params (a long operation's persisted progress); returns the record."""
        self._db.execute(
            "UPDATE operations SET params=?, updated_at=? WHERE op_id=?",
            (encoder.encode(params), time.time(), op_id),
        )
        op = self.operation(op_id)
        assert op is not None, op_id
        return op

    def energy(self) -> dict[str, HostEnergyRecord]:
        """Every host's energy counters, by host id."""
        rows = self._db.execute("SELECT host_id, joules, since FROM energy").fetchall()
        return {
            row[0]: HostEnergyRecord(host_id=row[0], joules=energy_decoder.decode(row[1]), since=row[2])
            for row in rows
        }

    def save_energy(self, joules: Mapping[str, Mapping[str, float]]) -> None:
        """Replace these hosts' counters; a host saved for the first time is counted from now."""
        now = time.time()
        with self.transaction():
            self._db.executemany(
                "INSERT INTO energy (host_id, joules, since, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(host_id) DO UPDATE SET joules=excluded.joules, updated_at=excluded.updated_at",
                [(host_id, encoder.encode(dict(j)), now, now) for host_id, j in joules.items()],
            )

    def setting(self, key: str) -> str | None:
        """A setting an operator changed at run time (kept in ``meta`` under ``setting.<key>``)."""
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (f"setting.{key}",)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (f"setting.{key}", value),
        )

    def operation(self, op_id: str) -> OperationRecord | None:
        row = self._db.execute("SELECT * FROM operations WHERE op_id=?", (op_id,)).fetchone()
        return None if row is None else op_of(row)

    def last_operation(self, vm: str, kind: OpKind | None = None) -> OperationRecord | None:
        """The newest operation on ``vm`` (of ``kind``, when given)."""
        if kind is None:
            row = self._db.execute(
                "SELECT * FROM operations WHERE vm=? ORDER BY created_at DESC LIMIT 1", (vm,)
            ).fetchone()
        else:
            row = self._db.execute(
                "SELECT * FROM operations WHERE vm=? AND kind=? ORDER BY created_at DESC LIMIT 1", (vm, kind)
            ).fetchone()
        return None if row is None else op_of(row)

    def latest_operation_times(self, kind: OpKind, since: float) -> dict[str, float]:
        """When each VM's newest operation of ``kind`` created after ``since`` was created, by VM."""
        rows = self._db.execute(
            "SELECT vm, MAX(created_at) FROM operations WHERE kind=? AND created_at>? GROUP BY vm",
            (kind, since),
        )
        return {r[0]: r[1] for r in rows}

    def running_operations(self) -> list[OperationRecord]:
        return [
            op_of(r)
            for r in self._db.execute("SELECT * FROM operations WHERE state='running' ORDER BY created_at")
        ]

    def operations_page(
        self,
        *,
        limit: int,
        before: tuple[float, str] | None = None,
        since: float | None = None,
        **equal: str,
    ) -> list[OperationRecord]:
        """Operations newest first: those created before ``before`` (created_at, op_id), after
        ``since``, and whose columns (kind, state, vm, host_id, parent) equal ``equal``.
        """
        where: list[str] = ["1=1"]
        args: list[object] = []
        for column, value in equal.items():
            assert column in ("kind", "state", "vm", "host_id", "parent"), column
            where.append(f"{column}=?")
            args.append(value)
        if since is not None:
            where.append("created_at>=?")
            args.append(since)
        if before is not None:
            where.append("(created_at<? OR (created_at=? AND op_id<?))")
            args.extend((before[0], before[0], before[1]))
        sql = f"SELECT * FROM operations WHERE {' AND '.join(where)} ORDER BY created_at DESC, op_id DESC LIMIT ?"
        return [op_of(r) for r in self._db.execute(sql, (*args, limit))]

    # -- events ---------------------------------------------------------------------------------

    def append_event(
        self, type_: str, message: str, *, host_id: str = "", vm: str = "", op_id: str = ""
    ) -> EventRecord:
        ts = time.time()
        cur = self._db.execute(
            "INSERT INTO events (ts, type, host_id, vm, op_id, message) VALUES (?, ?, ?, ?, ?, ?)",
            (ts, type_, host_id, vm, op_id, message),
        )
        assert cur.lastrowid is not None
        return EventRecord(
            seq=cur.lastrowid, ts=ts, type=type_, host_id=host_id, vm=vm, op_id=op_id, message=message
        )

    def events_since(self, seq: int, limit: int = 1000) -> list[EventRecord]:
        rows = self._db.execute(
            "SELECT seq, ts, type, host_id, vm, op_id, message FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [
            EventRecord(seq=r[0], ts=r[1], type=r[2], host_id=r[3], vm=r[4], op_id=r[5], message=r[6])
            for r in rows
        ]

    def last_event_seq(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)
