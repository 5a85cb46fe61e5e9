"""PlanetLab traces and the datacenter they run on in the literature.

A trace is a day of VM CPU utilisation, one VM a line of 5-minute percentages (see
``shared/data/README.md``); :func:`load_trace` reads one. :func:`standard_fleet` is the standard
datacenter of Beloglazov & Buyya (CCPE 2012) and CloudSim 3.0.3's PlanetLab examples: 800 hosts
alternating HP ProLiant ML110 G4 (2 x 1860 MIPS) and G5 (2 x 2660 MIPS), 4 GB and 1 Gbit/s each;
VMs of one core in four types by trace order.

Part of the trace evaluation; it imports :mod:`controller.balancer.model` and
:mod:`controller.balancer.power_model`.
"""

from __future__ import annotations

import gzip
import math
import pathlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.balancer.model import Fleet
from controller.balancer.power_model import HP_PROLIANT_ML110_G4, HP_PROLIANT_ML110_G5

__all__ = ["HOST_TYPES", "STANDARD_HOSTS", "VM_TYPES", "Trace", "TraceError", "load_trace", "standard_fleet"]

FloatArray = npt.NDArray[np.float64]

STANDARD_HOSTS = 800
#: VM types as (MIPS, RAM MB), one core each.
VM_TYPES: tuple[tuple[float, float], ...] = ((2500, 870), (2000, 1740), (1000, 1740), (500, 613))
#: Host types as (MIPS per core, cores); host i is type i % 2.
HOST_TYPES: tuple[tuple[float, int], ...] = ((1860, 2), (2660, 2))


class TraceError(ValueError):
    """A trace file that cannot be read as one VM per line of percentages."""


@dataclass(frozen=True, eq=False)
class Trace:
    """A day of VM CPU utilisation: ``utilization[v, i]`` is VM v's load (0..1) at ``i * 300`` s.

    One column past the samples repeats the last one, as CloudSim pads its in-memory model.
    """

    name: str
    vm_names: tuple[str, ...]
    utilization: FloatArray

    @property
    def vms(self) -> int:
        """Number of VMs."""
        return len(self.vm_names)

    @property
    def samples(self) -> int:
        """Samples per VM in the file."""
        return int(self.utilization.shape[1]) - 1


def load_trace(path: str | pathlib.Path) -> Trace:
    """Read a ``.csv`` or ``.csv.gz`` trace: ``vm_name,u0,u1,...`` with u in percent, one VM a line.

    Raises:
        TraceError: the file is missing, empty, ragged or holds values outside 0..100.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError as exc:
        raise TraceError(
            f"trace {str(path)!r}: cannot read it ({exc}); pass a .csv.gz from shared/data"
        ) from exc
    if not lines:
        raise TraceError(f"trace {str(path)!r}: no VMs in it; expected lines of vm_name,u0,u1,...")
    names: list[str] = []
    rows: list[list[float]] = []
    for number, line in enumerate(lines, start=1):
        name, *values = line.split(",")
        try:
            rows.append([float(value) for value in values])
        except ValueError as exc:
            raise TraceError(f"trace {str(path)!r} line {number} (vm {name!r}): {exc}") from exc
        names.append(name)
    width = len(rows[0])
    if width < 2 or any(len(row) != width for row in rows):
        raise TraceError(f"trace {str(path)!r}: every VM needs the same number (>= 2) of samples")
    percent = np.asarray(rows)
    if percent.min() < 0 or percent.max() > 100:
        raise TraceError(f"trace {str(path)!r}: utilisation must be a percentage 0..100")
    utilization = np.concatenate([percent, percent[:, -1:]], axis=1) / 100.0
    day = path.name.split(".")[0]
    return Trace(name=day, vm_names=tuple(names), utilization=utilization)


def standard_fleet(vms: int, hosts: int = STANDARD_HOSTS) -> Fleet:
    """The literature's datacenter for ``vms`` VMs: VM i gets type ``i // ceil(vms / 4)``."""
    kinds = np.arange(hosts, dtype=np.intp) % len(HOST_TYPES)
    core = np.array([HOST_TYPES[k][0] for k in kinds], dtype=np.float64)
    cores = np.array([HOST_TYPES[k][1] for k in kinds], dtype=np.float64)
    per_type = math.ceil(vms / len(VM_TYPES))
    vm_type = np.arange(vms) // per_type
    return Fleet(
        host_mips=core * cores,
        host_core_mips=core,
        host_kind=kinds,
        power_tables=np.array([HP_PROLIANT_ML110_G4.watts, HP_PROLIANT_ML110_G5.watts]),
        vm_mips=np.array([VM_TYPES[t][0] for t in vm_type], dtype=np.float64),
        vm_ram_mb=np.array([VM_TYPES[t][1] for t in vm_type], dtype=np.float64),
        binding_ram=False,
    )
