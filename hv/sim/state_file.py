"""The sim engine's persisted VM table: ``sim-vms.json`` in a host's state directory.

Like a real engine's, sim VMs outlive the agent: a driver writes its whole table after every change,
atomically, and reads it back when it opens. :class:`StateFile` does the reading and writing and maps
its failures to :class:`hv.driver.EngineError`; what the VMs mean is the caller's business.

Imports :mod:`hv.driver`, :mod:`hv.storage`, :mod:`hv.sim.vm` and :mod:`protocols`.
"""

from __future__ import annotations

import builtins
import pathlib
from collections.abc import Mapping
from typing import Literal

import msgspec

from hv.driver import EngineError
from hv.sim.vm import SavedVm, Vm
from hv.storage import write_atomic

__all__ = ["STATE_FILE", "SavedTable", "StateFile"]

#: File name of the persisted VM table inside ``state_dir``.
STATE_FILE = "sim-vms.json"


class SavedTable(msgspec.Struct, frozen=True, kw_only=True):
    """The on-disk form of a driver's VM table. ``version`` changes when the layout does."""

    version: Literal[1] = 1
    host_id: str
    vms: builtins.list[SavedVm] = []


class StateFile:
    """The VM table file of host ``host_id`` at ``path``."""

    def __init__(self, path: pathlib.Path, host_id: str) -> None:
        self.path = path
        self.host_id = host_id

    def save(self, vms: Mapping[str, Vm]) -> None:
        """Replace the file with ``vms``, sorted by name.

        Raises:
            EngineError: the directory cannot be created or the file cannot be written.
        """
        table = SavedTable(host_id=self.host_id, vms=[vms[n].saved() for n in sorted(vms)])
        data = msgspec.json.encode(table)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, data)
        except OSError as exc:
            raise EngineError(
                f"sim host {self.host_id!r} could not save its VM table to {self.path}: "
                f"{exc.strerror or exc}; check that the state directory exists and is writable"
            ) from exc

    def load(self) -> builtins.list[SavedVm]:
        """The VMs in the file, or none when there is no file yet.

        Raises:
            EngineError: the file cannot be read or decoded, or belongs to another host.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise EngineError(
                f"sim host {self.host_id!r} could not read its VM table {self.path}: "
                f"{exc.strerror or exc}; check the file's permissions"
            ) from exc
        try:
            table = msgspec.json.decode(data, type=SavedTable)
        except msgspec.DecodeError as exc:
            raise EngineError(
                f"sim host {self.host_id!r} found a damaged VM table {self.path}: {exc}; "
                "restore it from a backup or move it away to start with no VMs"
            ) from exc
        if table.host_id != self.host_id:
            raise EngineError(
                f"sim host {self.host_id!r}: the VM table {self.path} belongs to host {table.host_id!r}; "
                "give each host its own state directory"
            )
        return table.vms
