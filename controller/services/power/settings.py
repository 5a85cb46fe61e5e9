"""The power service's settings.

Plain data only: :class:`PowerSettings`, one frozen dataclass passed explicitly. The requests and
answers the API exchanges with the service (plans, outcomes, power reports) are the REST contract
and live in :mod:`protocols.rest`. It may import ``controller.hardware`` (the drivers' settings)
and ``protocols``; nothing else of the controller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.hardware import BmcConfig, EnergySettings, PowerDriver, WolConfig
from protocols.migration import MigrationPolicy
from protocols.rest import AutomationLevel

AUTOMATION_LEVELS: tuple[AutomationLevel, ...] = ("manual", "recommend", "auto")
#: The store's setting that keeps the level set at run time.
MODE_SETTING = "power.mode"


@dataclass(frozen=True, slots=True)
class PowerSettings:
    """Settings of the power service; see :mod:`controller.services.power` for what each rule does."""

    #: ``manual``: plan only when asked; ``recommend``: plan every round and publish; ``auto``: act.
    #: None: the level last set at run time (``fleetvisor power mode``, kept in the store), else manual.
    #: A level given here replaces the stored one.
    mode: AutomationLevel | None = None
    #: Seconds between rounds.
    interval_s: float = 30.0
    #: Empty hosts kept powered on, ready for new VMs.
    spare_hosts: int = 1
    #: Share of the powered-on CPU and memory kept free for the forecast demand.
    headroom: float = 0.2
    #: Extra free share a host's standby must leave on top of ``headroom`` (hysteresis: a host is not
    #: switched off on the very edge that would switch one on again).
    standby_margin: float = 0.1
    #: Rounds a host must have been empty before it may go to standby.
    idle_rounds: int = 3
    #: A VM never moves twice within this many seconds (any migration, the operator's included).
    cooldown_s: float = 600.0
    #: Migrations started per round, and at once per host (source or target).
    max_migrations_per_round: int = 4
    per_host: int = 2
    #: The planner's band: relieve a host whose likely forecast CPU is over ``overload``; place so that
    #: a host's forecast stays under ``target``; consider emptying hosts under ``underload``.
    overload: float = 0.85
    target: float = 0.75
    underload: float = 0.3
    #: Consolidate only when the energy saved over ``horizon_s`` is this multiple of the moves' price.
    min_gain: float = 1.0
    horizon_s: float = 3600.0
    #: Per-VM CPU samples (one per round) the forecasts see.
    history: int = 30
    #: The model's compute unit: MIPS of one core (a VM's demand is its CPU use times its vCPUs).
    mips_per_core: float = 1000.0
    #: How long a powered-on host's agent may take to report in before the power-on counts as failed.
    boot_timeout_s: float = 300.0
    #: A host whose power-on failed is not tried again for this long (another standby host is).
    wake_retry_s: float = 600.0
    #: After an operator powers a host on, the manager does not put it back in standby for this long.
    operator_hold_s: float = 3600.0
    #: How long a round waits for one of its migrations.
    migration_timeout_s: float = 600.0
    #: Seconds between energy samples (at most ``interval_s``).
    energy_interval_s: float = 5.0
    #: Seconds between saves of the energy counters (also saved when a host is first counted and when
    #: the controller stops; a crash loses at most this much counting).
    energy_save_s: float = 60.0
    energy: EnergySettings = field(default_factory=EnergySettings)
    #: The policy of the manager's migrations.
    migration_policy: MigrationPolicy = field(default_factory=MigrationPolicy)
    #: Each host's BMC (IPMI over LAN), Wake-on-LAN settings, and drivers given directly (sim power in
    #: tests). A host's methods are, in order: its direct driver, or else IPMI then Wake-on-LAN.
    bmcs: Mapping[str, BmcConfig] = field(default_factory=dict)
    wol: Mapping[str, WolConfig] = field(default_factory=dict)
    drivers: Mapping[str, PowerDriver] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What is wrong with these settings, for a person (empty when nothing is)."""
        out = []
        if self.mode is not None and self.mode not in AUTOMATION_LEVELS:
            out.append(f"mode {self.mode!r} is not one of {', '.join(AUTOMATION_LEVELS)}")
        if not self.interval_s > 0:
            out.append(f"interval_s must be positive, got {self.interval_s}")
        if self.spare_hosts < 0:
            out.append(f"spare_hosts must be 0 or more, got {self.spare_hosts}")
        if not 0 <= self.headroom < 1:
            out.append(f"headroom must be within 0..1 (a share of capacity), got {self.headroom}")
        if self.idle_rounds < 1:
            out.append(f"idle_rounds must be at least 1, got {self.idle_rounds}")
        if not 0 < self.underload < self.target <= self.overload:
            out.append(
                f"need 0 < underload < target <= overload, got {self.underload}, {self.target}, {self.overload}"
            )
        if self.max_migrations_per_round < 1 or self.per_host < 1:
            out.append("max_migrations_per_round and per_host must be at least 1")
        return out
