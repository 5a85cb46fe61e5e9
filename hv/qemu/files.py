"""Private directories for the qemu engine's per-VM state (atomic writes live in :mod:`hv.storage`).

Imports: the standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["make_private_dir"]


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed and make it mode 0700.

    Raises:
        OSError: it cannot be created, or is not a directory.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
