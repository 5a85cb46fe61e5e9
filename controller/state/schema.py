"""The store's SQL schema, and the steps that bring an older file up to it.

A new table or column is a new step in :data:`MIGRATIONS` and a bump of :data:`SCHEMA_VERSION`; a
step runs once, in order, inside a transaction. It imports nothing of ours.
"""

from __future__ import annotations

SCHEMA_VERSION = 8

#: Steps from one schema version to the next; each runs once, in order, inside a transaction.
MIGRATIONS: dict[int, str] = {
    # 1 -> 2: host labels, as the agent reports them and as operators set them.
    1: """
    ALTER TABLE hosts ADD COLUMN agent_labels BLOB NOT NULL DEFAULT x'80';
    ALTER TABLE hosts ADD COLUMN operator_labels BLOB NOT NULL DEFAULT x'80';
    """,
    # 2 -> 3: the destination a VM is migrating to holds a claim too.
    2: """
    ALTER TABLE vms ADD COLUMN migrating_to TEXT;
    """,
    # 3 -> 4: a host the power manager put in standby (switched off, not placeable), and since when.
    3: """
    ALTER TABLE hosts ADD COLUMN standby_since REAL;
    """,
    # 4 -> 5: each host's energy counters (joules by source), kept across controller restarts.
    4: """
    CREATE TABLE energy (
        host_id TEXT PRIMARY KEY,
        joules BLOB NOT NULL,
        since REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 5 -> 6: placement rules kept for a VM's life (its scheduling hints), groups with their one
    # policy, and a host's fencing (by HA, or confirmed down by an operator).
    5: """
    ALTER TABLE vms ADD COLUMN hints BLOB NOT NULL DEFAULT x'80';
    CREATE TABLE groups (name TEXT PRIMARY KEY, policy TEXT NOT NULL, created_at REAL NOT NULL);
    ALTER TABLE hosts ADD COLUMN fenced_at REAL;
    ALTER TABLE hosts ADD COLUMN fenced_how TEXT NOT NULL DEFAULT '';
    """,
    # 6 -> 7: enrolment (a host id is pending until accepted; an accepted host's capacity is kept to
    # judge later claims) and one-time join tokens, stored hashed. A host known before this version
    # has no enrolment row and counts as accepted; its next inventory records its capacity.
    6: """
    CREATE TABLE enrolment (
        host_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        boot_id TEXT NOT NULL,
        address TEXT NOT NULL,
        cores INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        reason TEXT NOT NULL,
        first_seen REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE join_tokens (
        token_hash TEXT PRIMARY KEY,
        host_id TEXT NOT NULL DEFAULT '',
        expires_at REAL NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 7 -> 8: an operation started by a bulk action names it as its parent.
    7: """
    ALTER TABLE operations ADD COLUMN parent TEXT NOT NULL DEFAULT '';
    CREATE INDEX ops_parent ON operations (parent);
    """,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (
    host_id TEXT PRIMARY KEY,
    online INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    address TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    capabilities BLOB NOT NULL,
    maintenance INTEGER NOT NULL DEFAULT 0,
    state_reason TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL,
    spec BLOB NOT NULL,
    host_id TEXT,
    state TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    disk_gib INTEGER NOT NULL,
    op_id TEXT,
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS vms_by_host ON vms (host_id);
CREATE TABLE IF NOT EXISTS operations (
    op_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    vm TEXT NOT NULL,
    host_id TEXT,
    state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    params BLOB NOT NULL,
    deadline REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ops_running ON operations (state);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    type TEXT NOT NULL,
    host_id TEXT NOT NULL DEFAULT '',
    vm TEXT NOT NULL DEFAULT '',
    op_id TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL
);
"""
