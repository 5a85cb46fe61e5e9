"""High availability: act on host failures without ever running a VM twice.

The order is always detect, then fence, then restart:
1. :mod:`controller.services.ha.detector` turns Last Wills and heartbeat gaps into ``host.suspect`` and
   ``host.failed``, and its storm guard holds back when many hosts vanish at once. Where a host has a
   BMC, a suspect or offline host whose BMC reads power off is failed at once.
2. A failed host is **fenced** before anything is restarted: something must confirm that its VMs
   cannot still be running. With no confirmation, nothing is restarted, and an ``ha.fence_failed``
   alert says why. This is the split-brain guard.
3. Its HA VMs are restarted elsewhere, highest ``ha_priority`` first. Each restart is a persistent
   ``restart`` operation that moves the VM's claim to the new host in one transaction.

Fencing methods (``controller --ha-fencing``):
- ``none`` (the default): nothing can confirm, so a failure only raises the alert. This is the safe
  choice until a fence is configured.
- ``process``: for hosts that are processes on this machine (demo, tests, benchmarks). It kills the
  host's agent and QEMU processes by PID; see :mod:`controller.hardware.fencing`. A BMC power-off takes its
  place on real hardware once the power-management work lands.
- ``bmc`` (``--bmc-config FILE``): power the host off through its BMC over IPMI, and restart only once
  the BMC reads "off". This is the method for real hardware.
- ``lease``: agents started with ``--ha-lease S`` destroy their HA VMs after S seconds without the
  bus. The controller waits S plus a margin after it declared the host failed. The price is real: an
  HA VM then stops whenever its host loses the broker for S seconds, even when nothing else is wrong.
  That breaks "VMs keep running while the controller or broker is away" for HA VMs, so it is opt-in.

If a fenced host comes back and still reports a VM that now runs elsewhere, reconciliation finds the
stale copy and :mod:`controller.services.cleanup` tells the host to undefine it, so a VM runs exactly
once.

A host the power service put in standby (:mod:`controller.services.power`) is switched off on purpose
and holds no VM: its silence is expected. The power service lists such hosts in
:class:`controller.state.live.StandbyHosts`, which HA only reads, and HA skips them: no suspect, no
failure, no BMC check, no fencing, no restart. The host is judged again once it speaks (power-on) and leaves standby.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from controller.common.errors import Conflict, NotFound
from controller.common.tasks import TaskSet
from controller.hardware import BmcConfig, PowerError, factory
from controller.hardware.fencing import BmcFencer, ProcessFencer
from controller.scheduler import FleetState, Scheduler
from controller.services.ha.detector import DetectorSettings, FailureDetector, Transition
from controller.services.moves import VmMoves
from controller.state.events import EventHub
from controller.state.live import StandbyHosts
from controller.state.store import Store
from protocols.bus import Bus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HaSettings:
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    fencing: Literal["none", "process", "lease", "bmc"] = "none"
    #: For ``bmc`` fencing: each host's BMC (see :func:`controller.hardware.fencing.load_bmc_config`).
    bmcs: Mapping[str, BmcConfig] = field(default_factory=dict)
    #: For ``process`` fencing: the directory holding each host's state directory (``DIR/<host>/``).
    fence_dir: pathlib.Path | None = None
    #: For ``lease`` fencing; must match the agents' ``--ha-lease``.
    lease_s: float = 3.0
    lease_margin_s: float = 0.5
    #: Admission control: refuse placements that would leave the HA VMs of this many failed hosts
    #: without room to restart (0: off).
    host_failures_to_tolerate: int = 0
    tick_s: float = 0.1


class HaService:
    """Detects failed hosts, fences them, and restarts their HA VMs elsewhere."""

    def __init__(
        self,
        store: Store,
        events: EventHub,
        scheduler: Scheduler,
        fleet_state: FleetState,
        moves: VmMoves,
        standby: StandbyHosts,
        buses: tuple[Bus, ...],
        settings: HaSettings,
    ) -> None:
        self.store = store
        self.events = events
        self.scheduler = scheduler
        self.fleet_state = fleet_state
        self.moves = moves
        #: Hosts in standby (kept by the power service): switched off on purpose, never failed.
        self.standby_hosts = standby
        #: The connections heartbeats and Last Wills arrive on: while one is down, nothing is judged.
        self.buses = buses
        self.settings = settings
        self.detector = FailureDetector(settings.detector)
        self.last_heartbeat: dict[str, float] = {}
        self._handling: set[str] = set()
        self._tasks = TaskSet("HA")
        self._bmc_checks: dict[str, asyncio.Task[None]] = {}
        self._bmc_checked: dict[str, float] = {}

    # -- inputs (called from bus handlers; quick) -----------------------------------------------

    def heartbeat(self, host_id: str) -> None:
        now = time.monotonic()
        self.last_heartbeat[host_id] = now
        self.detector.heartbeat(host_id, now)
        if self.detector.state(host_id) in ("failed", "offline"):
            self._report(self.detector.revive(host_id, now))

    def host_state(self, host_id: str, online: bool, reason: str) -> None:
        now = time.monotonic()
        if online:
            self.last_heartbeat[host_id] = now
            self.detector.connected(host_id, now)
            self.detector.heartbeat(host_id, now)
            self._report(self.detector.revive(host_id, now))
        elif reason == "agent stopped" or host_id in self.standby_hosts:
            # A host going to standby may lose its agent either way (SIGTERM, or power cut first).
            self.detector.stopped_cleanly(host_id, now)
        else:
            self.detector.connection_lost(host_id, now, reason)

    # -- the loop -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel recoveries and BMC checks still under way."""
        await self._tasks.close()

    async def run(self) -> None:
        """Judge every host's health each tick, until cancelled."""
        was_storm = False
        observer_down = False
        heard_before = False
        while True:
            await asyncio.sleep(self.settings.tick_s)
            try:
                if not all(b.connected.is_set() for b in self.buses):
                    # We hear nothing (or no heartbeats), so we judge nothing. Only a connection we had
                    # and lost calls for a rearm: at the first connect there is no silence to forgive.
                    observer_down = heard_before
                    continue
                heard_before = True
                if observer_down:
                    observer_down = False
                    self.detector.rearm(time.monotonic())
                was_storm = self._tick(was_storm)
            except Exception:
                log.exception("HA tick failed")

    def _tick(self, was_storm: bool) -> bool:
        """One look at every host; returns whether the fleet is in a storm now."""
        for change in self.detector.tick(time.monotonic()):
            self._report(change)
        self._ask_bmcs()
        if self.detector.storm == was_storm:
            return was_storm
        if self.detector.storm:
            self.events.emit(
                "ha.storm",
                "many hosts went quiet at once: suspecting the broker or the network, "
                "not the hosts; no host is declared failed until this clears",
            )
        else:
            self.detector.rearm(time.monotonic())
            self.events.emit("ha.storm_over", "the storm has cleared; failure detection resumes")
        return self.detector.storm

    def _ask_bmcs(self) -> None:
        """Third signal: for a suspect or offline host with a BMC, ask the BMC whether it has power.

        A host whose agent stopped cleanly looks merely offline, yet if its power is gone so are its
        VMs; and a suspect host whose BMC reads off needs no more waiting.
        """
        now = time.monotonic()
        for host_id, config in self.settings.bmcs.items():
            if host_id in self.standby_hosts or self.detector.state(host_id) not in ("suspect", "offline"):
                continue
            running = self._bmc_checks.get(host_id)
            if (running is not None and not running.done()) or now - self._bmc_checked.get(
                host_id, 0.0
            ) < 1.0:
                continue
            self._bmc_checked[host_id] = now
            self._bmc_checks[host_id] = self._tasks.spawn(
                self._check_bmc(host_id, config), name=f"bmc:{host_id}"
            )

    async def _check_bmc(self, host_id: str, config: BmcConfig) -> None:
        try:
            status = await factory.bmc_driver(config).status()
        except PowerError as exc:
            log.info("BMC of %s did not answer: %s", host_id, exc)
            return
        if (
            status == "off"
            and host_id not in self.standby_hosts
            and self.detector.state(host_id) in ("suspect", "offline")
        ):
            reason = f"its BMC at {config.address}:{config.port} reports power off"
            self._report(self.detector.declare_failed(host_id, time.monotonic(), reason))

    def _report(self, change: Transition | None) -> None:
        if change is None:
            return
        if change.host_id in self.standby_hosts and change.new in ("suspect", "failed"):
            log.info("host %s is in standby; not %s (%s)", change.host_id, change.new, change.reason)
            return
        self.events.emit(
            f"host.{change.new}",
            f"host {change.host_id} is {change.new}: {change.reason}",
            host_id=change.host_id,
        )
        if change.new == "failed" and change.host_id not in self._handling:
            self._handling.add(change.host_id)
            task = self._tasks.spawn(self._recover(change.host_id), name=f"ha:{change.host_id}")
            host_id = change.host_id
            task.add_done_callback(lambda _t: self._handling.discard(host_id))

    # -- fencing and restart --------------------------------------------------------------------

    async def fence(self, host_id: str) -> tuple[bool, str]:
        """Confirm that ``host_id`` cannot be running its VMs. Returns (confirmed, how or why not)."""
        if self.settings.fencing == "none":
            return (
                False,
                "no fencing is configured (--ha-fencing), so nothing can confirm its VMs are stopped",
            )
        if self.settings.fencing == "bmc":
            return await BmcFencer(self.settings.bmcs).fence(host_id)
        if self.settings.fencing == "process":
            if self.settings.fence_dir is None:
                return False, "process fencing needs --fence-dir"
            return await ProcessFencer(self.settings.fence_dir).fence(host_id)
        expires = time.monotonic() + self.settings.lease_s + self.settings.lease_margin_s
        while time.monotonic() < expires:
            if self.detector.state(host_id) != "failed":
                return False, "the host came back before its lease expired"
            await asyncio.sleep(min(0.05, max(0.0, expires - time.monotonic())))
        return True, f"lease expired: the agent self-fences after {self.settings.lease_s:g}s without the bus"

    async def _recover(self, host_id: str) -> None:
        ha_vms = [vm for vm in self.store.vms(host_id) if vm.spec.ha and vm.op_id is None]
        if not ha_vms:
            return
        fenced, how = await self.fence(host_id)
        if not fenced:
            self.events.emit(
                "ha.fence_failed",
                f"host {host_id} failed but is not fenced ({how}); its {len(ha_vms)} HA VM(s) stay put "
                "to avoid running them twice; once you have made sure the host is off, "
                f"`fleetvisor host confirm-down {host_id}` lets them restart",
                host_id=host_id,
            )
            return
        self.store.set_host_fenced(host_id, time.time(), how)
        self.events.emit("ha.fenced", f"host {host_id} fenced: {how}", host_id=host_id)
        self._restart_all(host_id)

    def confirm_down(self, host_id: str) -> int:
        """An operator made sure ``host_id`` is off: record it as fenced and restart its HA VMs elsewhere.

        This is the manual fence acknowledgement (oVirt's "Confirm host has been rebooted"): HA may then
        restart the host's VMs even with no fencing configured. Returns how many restarts began.

        Raises:
            NotFound: an unknown host. Conflict: the host is online and heard (it is not down).
        """
        host = self.store.host(host_id)
        if host is None:
            raise NotFound(
                "unknown_host", f"host {host_id!r} is not known; list hosts with `fleetvisor host list`"
            )
        if host.online and self.detector.state(host_id) in ("up", "suspect"):
            raise Conflict(
                "host_online",
                f"host {host_id!r} is online and its agent is heard; confirm-down is for a host you have made "
                "sure is off (powered down or disconnected). Stop it first, or use `fleetvisor host evacuate`",
            )
        self.store.set_host_fenced(host_id, time.time(), "confirmed down by an operator")
        self.events.emit(
            "host.confirmed_down",
            f"host {host_id} confirmed down by an operator: its VMs are taken as stopped",
            host_id=host_id,
        )
        return self._restart_all(host_id)

    def _restart_all(self, host_id: str) -> int:
        """Restart every HA VM recorded on the fenced ``host_id``, highest priority first."""
        ha_vms = [vm for vm in self.store.vms(host_id) if vm.spec.ha and vm.op_id is None]
        ha_vms.sort(key=lambda vm: (-vm.spec.ha_priority, vm.name))
        started = 0
        for vm in ha_vms:
            current = self.store.vm(vm.name)
            if current is None or current.host_id != host_id or current.op_id is not None:
                continue
            started += self.restart(vm.name, host_id)
        return started

    def restart(self, name: str, failed_host: str) -> bool:
        """Restart HA VM ``name`` of ``failed_host`` elsewhere, under its placement rules.

        Returns whether a restart began; when none can, the VM's record and an event say why.
        """
        bad = sorted({h for h, s in self.detector.hosts.items() if s.state != "up"} | {failed_host})
        started = self.moves.restart_elsewhere(name, failed_host, bad)
        if isinstance(started, str):
            self.store.update_vm(name, error=f"HA restart impossible: {started}")
            self.events.emit(
                "ha.restart_failed", f"vm {name} (HA) cannot restart: {started}", host_id=failed_host, vm=name
            )
            return False
        return True
