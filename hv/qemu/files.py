"""Small file helpers the qemu engine shares: atomic writes and private directories."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["make_private_dir", "write_atomic"]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never a torn one.

    Raises:
        OSError: the directory is missing or not writable, or the disk is full.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed and make it mode 0700.

    Raises:
        OSError: it cannot be created, or is not a directory.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
