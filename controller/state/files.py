"""The store's file: opening it safely, and its online backup and restore.

- A store file is private to the controller (mode 0600): it holds API token hashes and the fleet's
  records.
- A damaged file is refused with a clear error at start (never silently started empty, never a
  traceback): a 0-byte file, a file that is not SQLite, or one that fails SQLite's quick check.
- One controller at a time: a running store holds an exclusive lock on ``<db>.lock``, which a second
  controller and ``store restore`` respect.
- ``backup`` uses SQLite's online backup API, so it is consistent while the controller writes.

It imports ``controller.state.schema`` only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import sqlite3

from controller.state.schema import SCHEMA_VERSION

#: The exit status of a controller whose store cannot be used (EX_CONFIG): the systemd unit does not
#: restart on it, so a damaged store is one clear error, not a restart loop.
EXIT_BAD_STORE = 78


class StoreError(Exception):
    """The store cannot be opened or used; the message says which file and what to do."""


def _fix(path: str) -> str:
    return (
        f"restore a backup with `fleetvisor store restore BACKUP --db {path}`, or move the file away "
        "to start an empty store (its VMs are then adopted again from what the agents report)"
    )


def check_file(path: str) -> None:
    """Refuse a store file that exists but cannot be a good store (0 bytes, not SQLite, damaged).

    Raises:
        StoreError: naming the file, what is wrong and the fix.
    """
    file = pathlib.Path(path)
    if not file.exists():
        return
    size = file.stat().st_size
    if size == 0:
        raise StoreError(f"the state store {path!r} is empty (0 bytes): it was truncated; {_fix(path)}")
    with open(path, "rb") as handle:
        header = handle.read(16)
    if header != b"SQLite format 3\x00":
        raise StoreError(f"the state store {path!r} is not an SQLite database ({size} bytes); {_fix(path)}")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            result = db.execute("PRAGMA quick_check(1)").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"the state store {path!r} is damaged ({exc}); {_fix(path)}") from None
    if result is None or result[0] != "ok":
        raise StoreError(
            f"the state store {path!r} is damaged ({result[0] if result else 'no answer'}); {_fix(path)}"
        )


def make_private(path: str) -> None:
    """Make the store file readable by its owner only (it holds token hashes and the fleet's records)."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, 0o600)


def lock(path: str) -> int:
    """Take the exclusive lock of the store at ``path``: held while the returned descriptor is open.

    Raises:
        StoreError: another controller (or a restore) holds it.
    """
    fd = os.open(f"{path}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"the state store {path!r} is in use by another controller (its lock {path}.lock is held); "
            "stop that controller first, or give this one its own --db"
        ) from None
    return fd


def backup(db_path: str, target: str) -> dict[str, int]:
    """Copy the store at ``db_path`` to ``target`` consistently, even while a controller writes it.

    Returns the row counts of the copy. Raises:
        StoreError: the store cannot be read, or the target cannot be written.
    """
    check_file(db_path)
    if not pathlib.Path(db_path).exists():
        raise StoreError(f"there is no state store at {db_path!r}; name it with --db")
    try:
        with (
            contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as source,
            contextlib.closing(sqlite3.connect(target)) as copy,
        ):
            source.backup(copy)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot back up {db_path!r} to {target!r}: {exc}") from None
    make_private(target)
    return _counts(target)


def restore(backup_path: str, db_path: str) -> dict[str, int]:
    """Put the backup at ``backup_path`` in place of the store at ``db_path`` (no controller may run).

    Returns the row counts restored. Raises:
        StoreError: the backup is damaged or too new, or a controller holds the store.
    """
    check_file(backup_path)
    if not pathlib.Path(backup_path).exists():
        raise StoreError(f"there is no backup at {backup_path!r}")
    version = _counts(backup_path).get("schema_version", 0)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the backup {backup_path!r} has schema version {version}, this controller knows up to "
            f"{SCHEMA_VERSION}; restore it with a matching or newer fleetvisor"
        )
    pathlib.Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    held = lock(db_path)
    try:
        with (
            contextlib.closing(sqlite3.connect(f"file:{backup_path}?mode=ro", uri=True)) as source,
            contextlib.closing(sqlite3.connect(db_path)) as store,
        ):
            source.backup(store)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot restore {backup_path!r} into {db_path!r}: {exc}") from None
    finally:
        os.close(held)
    make_private(db_path)
    return _counts(db_path)


def _counts(path: str) -> dict[str, int]:
    """Rows per table of the store at ``path``, and its schema version."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            counts = {
                table: int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                for table in ("hosts", "vms", "operations", "events")
            }
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"{path!r} is not a Fleetvisor store ({exc})") from None
    counts["schema_version"] = int(row[0]) if row else 0
    return counts
