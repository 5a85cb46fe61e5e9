"""The store's file: private, one controller at a time, refused clearly when damaged, and backed up
online and restored with the real ``fleetvisor`` command on real SQLite files.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from controller.state.files import EXIT_BAD_STORE
from controller.state.store import Store, StoreError
from protocols.vmspec import VmSpec
from tests.support.processes import ROOT


def _fleetvisor(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetvisor", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_a_new_store_is_private_to_its_owner(tmp_path: Path) -> None:
    """The store file holds token hashes and the fleet: mode 0600, not world-readable."""
    store = Store(tmp_path / "s.sqlite")
    store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "s.sqlite").st_mode) == 0o600


def test_a_second_controller_on_the_same_store_is_refused(tmp_path: Path) -> None:
    """While one Store holds the file, another is refused with who holds it; after close it opens."""
    first = Store(tmp_path / "s.sqlite")
    with pytest.raises(StoreError, match="in use by another controller"):
        Store(tmp_path / "s.sqlite")
    first.close()
    Store(tmp_path / "s.sqlite").close()


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"", "empty (0 bytes)"), (b"this is not a database at all" * 100, "not an SQLite database")],
)
def test_a_damaged_store_is_one_clear_error_at_start_never_an_empty_fleet(
    tmp_path: Path, content: bytes, what: str
) -> None:
    """`fleetvisor controller` on a truncated or foreign file exits 78 with the fix, no traceback, file kept."""
    db = tmp_path / "state.sqlite"
    db.write_bytes(content)
    result = _fleetvisor("controller", "--db", str(db), "--port", "0", "--broker", "mqtt://127.0.0.1:1")
    assert result.returncode == EXIT_BAD_STORE, result
    assert what in result.stderr and "fleetvisor store restore" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert db.read_bytes() == content, "nothing is changed"


def test_a_store_with_a_damaged_page_is_refused(tmp_path: Path) -> None:
    """A real store with bytes overwritten in its data fails SQLite's quick check at open."""
    db = tmp_path / "s.sqlite"
    store = Store(db)
    for i in range(200):
        store.insert_vm(VmSpec(name=f"vm-{i}", memory_mib=256), None, "stopped", None)
    store.close()
    raw = bytearray(db.read_bytes())
    middle = len(raw) // 2 // 4096 * 4096
    raw[middle : middle + 4096] = b"\xff" * 4096  # one whole page of VM rows, header included
    db.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"damaged|not an SQLite"):
        Store(db)


def test_backup_is_consistent_while_a_controller_writes_and_restore_puts_it_back(tmp_path: Path) -> None:
    """An online backup taken during writes opens as a good store; restore refuses a running store."""
    db = tmp_path / "live.sqlite"
    store = Store(db)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            store.insert_vm(VmSpec(name=f"w-{i}", memory_mib=256), None, "stopped", None)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        backup = tmp_path / "backup.sqlite"
        result = _fleetvisor("store", "backup", str(backup), "--db", str(db))
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stderr
    assert "vms" in result.stdout and stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    result = _fleetvisor("store", "restore", str(backup), "--db", str(db))
    assert result.returncode == EXIT_BAD_STORE and "in use by another controller" in result.stderr
    saved = len(store.vms())
    store.close()
    copy = Store(backup)
    in_backup = len(copy.vms())
    copy.close()
    assert 0 < in_backup <= saved
    result = _fleetvisor("store", "restore", str(backup), "--db", str(db))
    assert result.returncode == 0, result.stderr
    restored = Store(db)
    assert len(restored.vms()) == in_backup
    restored.close()
