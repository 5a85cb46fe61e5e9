"""Power management and load balancing on the live fleet: one loop that moves VMs and switches hosts.

The :class:`PowerService` is the controller's single policy engine for both jobs, so nothing fights
it: every ``interval_s`` the same round decides relief migrations (a host is, or is about to be,
overloaded), consolidation migrations (a lightly loaded host can be emptied and the saving pays for
the moves) and power actions (put an empty host in standby, power a standby host on ahead of demand).

A round:

1. **Observe.** Read each host's latest telemetry and keep, per VM, its CPU use in the last
   ``history`` rounds; sum the fleet-wide demand; count how many rounds each host has been empty;
   notice standby hosts whose agent came back (a new ``boot_id``), and power-ons that never did.
2. **Plan** (levels ``recommend`` and ``auto``). Build the balancer's model from the live fleet
   (:class:`~controller.balancer.model.Fleet` and :class:`~controller.balancer.model.Snapshot`:
   ``mips_per_core`` MIPS per core, each VM's demand from its history) and ask Fleetvisor's planner
   (:class:`~controller.balancer.planner.FleetvisorPolicy`: predictive overload detection,
   hysteresis between ``underload`` and ``target``, the migration cost model, ``min_gain``) for
   migrations. Standby hosts are in the model as switched off, which the planner wakes only to
   relieve an overload no running host can take. VMs that moved within ``cooldown_s``, that are busy
   or that are not running are frozen. Then the power rules below add power actions, and every step
   gets a reason a person can read.
3. **Act** (level ``auto``, or once on ``POST /plan/apply``): power-ons first, then the migrations in
   waves (at most ``max_migrations_per_round`` per round and ``per_host`` at once per host), each
   through :meth:`controller.services.migration.migrate.MigrationService.start`, so the scheduler's hard constraints
   (capacity, anti-affinity, labels, maintenance) hold; a refusal is skipped and reported. Standby
   actions come last.

Power rules:

- **Standby.** A host empty (no VM at all, not even a claim) for ``idle_rounds`` rounds goes to
  standby when it is not one of the ``spare_hosts`` empty hosts kept on, and the hosts left on keep
  ``headroom`` (plus ``standby_margin``, the hysteresis) of their CPU and memory free for the
  forecast demand. First its wake path is verified (:meth:`PowerDriver.verify_wake_path`: the BMC
  answers, the Wake-on-LAN MAC is sound); a host nobody could wake is never switched off. Then it is
  marked standby in the store (it survives a controller restart) and in the scheduler (not
  placeable), HA is told to leave it alone, and only then is it powered off.
- **Power on ahead of demand.** When the forecast fleet demand (a least-squares line through the
  recent demand plus one standard error, the planner's own predictor) or the claimed memory exceeds
  ``1 - headroom`` of what is powered on, when an overloaded host cannot be relieved by running
  hosts, or when fewer than ``spare_hosts`` empty hosts are on, the most power-efficient standby
  host is powered on. It leaves standby when its agent reports in (a new ``boot_id``); until then
  nothing is placed on it.
- **Fallback and alerts.** A host's methods are tried in order (IPMI, then Wake-on-LAN:
  :class:`~controller.hardware.FallbackPower`). When every method fails, a ``power.alert`` event names
  the host, each method's error and what to check, and the next standby host is tried. A power-on
  whose agent does not report within ``boot_timeout_s`` raises the same alert.

Energy: an :class:`~controller.hardware.EnergyMeter` counts each host's kWh since counting began
(the counters are kept in the store across controller restarts), from the BMC's DCMI power reading
where there is one, from the host's power model (its reported ``power_idle_w``/``power_max_w`` at its
telemetry CPU use) otherwise, and as 0 W in standby.

The modules, each importing only those above it and never ``controller.services.ha``,
``controller.api``, ``controller.intake`` or ``controller.daemon``:

- :mod:`.settings`: :class:`PowerSettings` and the Structs the API serves and reads;
- :mod:`.tracking`: what the service remembers between rounds (:class:`~.tracking.PowerTracking`);
- :mod:`.standby`: marking a host standby in the store, the scheduler and HA's view, and back;
- :mod:`.view`: the planner's model of the live fleet for one round;
- :mod:`.planning`: the plan, its reasons, its budget and its power actions;
- :mod:`.actions`: carrying a plan out (power-ons, migrations in waves, standby);
- :mod:`.energy`: sampling and saving each host's energy;
- :mod:`.operator`: an operator's host power views and requests;
- :mod:`.manager`: :class:`PowerService`, the round loop, observation, the level and the status.
  Only this ``__init__`` imports it.
"""

from __future__ import annotations

from controller.services.power.manager import PowerService
from controller.services.power.settings import AUTOMATION_LEVELS, PowerSettings
from protocols.rest import (
    AutomationLevel,
    HostPower,
    HostPowerReport,
    HostPowerRequest,
    ModeRequest,
    Plan,
    PlannedMove,
    PlannedPowerAction,
    PlanOutcome,
    PowerStatus,
    StepResult,
    WakeCheckView,
)

__all__ = [
    "AUTOMATION_LEVELS",
    "AutomationLevel",
    "HostPower",
    "HostPowerReport",
    "HostPowerRequest",
    "ModeRequest",
    "Plan",
    "PlanOutcome",
    "PlannedMove",
    "PlannedPowerAction",
    "PowerService",
    "PowerSettings",
    "PowerStatus",
    "StepResult",
    "WakeCheckView",
]
