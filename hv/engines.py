"""Choose a hypervisor engine by name. Engines are imported lazily so one never loads another."""

from __future__ import annotations

import pathlib
from typing import Any

from hv.driver import Driver

ENGINES = ("sim", "qemu")


class UnknownEngine(ValueError):
    pass


def create_driver(name: str, *, host_id: str, state_dir: pathlib.Path | None, **options: Any) -> Driver:
    """Build the engine called ``name`` for host ``host_id``.

    ``options`` go to the engine's constructor (see :class:`hv.sim.driver.SimDriver` and
    :class:`hv.qemu.driver.QemuDriver`).

    Raises:
        UnknownEngine: no engine has that name.
        ValueError: the engine refused its options.
    """
    if name == "sim":
        from hv.sim.driver import SimDriver

        return SimDriver(host_id=host_id, state_dir=state_dir, **options)
    if name == "qemu":
        from hv.qemu.driver import QemuDriver

        return QemuDriver(host_id=host_id, state_dir=state_dir, **options)
    raise UnknownEngine(f"unknown hypervisor engine {name!r}; choose one of: {', '.join(ENGINES)}")
