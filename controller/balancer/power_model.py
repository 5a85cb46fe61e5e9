"""Host power as a function of CPU utilisation, from SPECpower tables (watts at 0 %, 10 %, ... 100 %).

The balancer and the trace-driven simulator share this model, so a planner's idea of what a move
saves and the simulator's energy bill agree. Between two measured points power is interpolated
linearly, as CloudSim's ``PowerModelSpecPower`` does; a host with nothing on it is switched off and
draws nothing, which is the simulator's business (see :mod:`controller.balancer.evaluation.simulation`),
not this table's: ``power(0.0)`` is the idle power of a host that is on. It imports nothing of the
project.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["HP_PROLIANT_ML110_G4", "HP_PROLIANT_ML110_G5", "SpecPowerModel", "power_of"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class SpecPowerModel:
    """A SPECpower table: ``watts[i]`` is the power at ``i * 10`` % CPU load, eleven points in all."""

    name: str
    watts: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.watts) != 11:
            raise ValueError(f"power model {self.name!r}: need 11 points (0 %..100 %), got {len(self.watts)}")
        if any(b < a for a, b in zip(self.watts, self.watts[1:], strict=False)):
            raise ValueError(f"power model {self.name!r}: power must not fall as load rises: {self.watts}")

    @property
    def idle_watts(self) -> float:
        """Power of a host that is on but does nothing."""
        return self.watts[0]

    @property
    def max_watts(self) -> float:
        """Power at full load."""
        return self.watts[10]

    def power(self, utilization: float) -> float:
        """Watts at ``utilization`` (0..1), interpolated linearly between the table's points.

        Raises:
            ValueError: ``utilization`` outside 0..1 (CloudSim refuses those too).
        """
        if not 0.0 <= utilization <= 1.0:
            raise ValueError(f"power model {self.name!r}: utilisation must be within 0..1, got {utilization}")
        return float(power_of(np.asarray(self.watts)[None, :], np.array([0]), np.array([utilization]))[0])


def power_of(tables: FloatArray, kinds: npt.NDArray[np.intp], utilization: FloatArray) -> FloatArray:
    """Vectorised power: row ``kinds[i]`` of ``tables`` (shape kinds x 11) at ``utilization[i]``.

    Utilisation is clipped to 0..1 first, so the rounding of a sum that lands a hair above 1 costs
    nothing.
    """
    u10 = np.clip(utilization, 0.0, 1.0) * 10.0
    low = np.minimum(np.floor(u10).astype(np.intp), 9)
    p_low = tables[kinds, low]
    return np.asarray(p_low + (tables[kinds, low + 1] - p_low) * (u10 - low), dtype=np.float64)


#: HP ProLiant ML110 G4 (Xeon 3040, 2 cores x 1860 MIPS), SPECpower_ssj2008.
HP_PROLIANT_ML110_G4 = SpecPowerModel(
    "HP ProLiant ML110 G4", (86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0)
)
#: HP ProLiant ML110 G5 (Xeon 3075, 2 cores x 2660 MIPS), SPECpower_ssj2008.
HP_PROLIANT_ML110_G5 = SpecPowerModel(
    "HP ProLiant ML110 G5", (93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0)
)
